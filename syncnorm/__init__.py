"""syncnorm: batch norm whose statistics are exact over all workers' batches."""

from syncnorm.batchnorm import SyncBatchNorm
from syncnorm.convert import convert_sync_batchnorm, name_layers, revert_sync_batchnorm
from syncnorm.moments import Moments
from syncnorm.transports import (
    LayerKey,
    LayerMismatchError,
    StatsReducer,
    TorchDistributedReducer,
    consecutive_groups,
)

__version__ = "0.1.0"

__all__ = [
    "LayerKey",
    "LayerMismatchError",
    "Moments",
    "StatsReducer",
    "SyncBatchNorm",
    "TorchDistributedReducer",
    "consecutive_groups",
    "convert_sync_batchnorm",
    "name_layers",
    "revert_sync_batchnorm",
]

"""syncnorm: batch norm whose statistics are exact over all workers' batches."""

from syncnorm.batchnorm import SyncBatchNorm
from syncnorm.convert import convert_sync_batchnorm, name_layers, revert_sync_batchnorm
from syncnorm.coordinator.client import load_global_stats
from syncnorm.join import SyncBatchNormJoin, join_ready_ddp
from syncnorm.moments import Moments
from syncnorm.norms import (
    SyncBatchInstanceNorm2d,
    SyncConditionalBatchNorm2d,
    SyncMeanOnlyBatchNorm2d,
    SyncSwitchableNorm2d,
    clip_rho_after_steps,
)
from syncnorm.precise_bn import precise_bn
from syncnorm.transports import (
    LayerKey,
    LayerMismatchError,
    StatsReducer,
    SynchronizationError,
    TorchDistributedReducer,
    consecutive_groups,
)
from syncnorm.uneven import GlobalBatchMean

__version__ = "0.1.0"

__all__ = [
    "GlobalBatchMean",
    "LayerKey",
    "LayerMismatchError",
    "Moments",
    "StatsReducer",
    "SyncBatchInstanceNorm2d",
    "SyncBatchNorm",
    "SyncBatchNormJoin",
    "SyncConditionalBatchNorm2d",
    "SyncMeanOnlyBatchNorm2d",
    "SyncSwitchableNorm2d",
    "SynchronizationError",
    "TorchDistributedReducer",
    "clip_rho_after_steps",
    "consecutive_groups",
    "convert_sync_batchnorm",
    "join_ready_ddp",
    "load_global_stats",
    "name_layers",
    "precise_bn",
    "revert_sync_batchnorm",
]

"""Transports: how SyncBN statistics travel between workers."""

from syncnorm.transports.base import LayerKey, LayerMismatchError, StatsReducer, SynchronizationError
from syncnorm.transports.torch_distributed import (
    FASTEST_PRIMITIVE,
    TorchDistributedReducer,
    consecutive_groups,
    default_reducer,
)

__all__ = [
    "FASTEST_PRIMITIVE",
    "LayerKey",
    "LayerMismatchError",
    "StatsReducer",
    "SynchronizationError",
    "TorchDistributedReducer",
    "consecutive_groups",
    "default_reducer",
]

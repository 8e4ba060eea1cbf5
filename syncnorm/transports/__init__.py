"""Transports: how SyncBN statistics travel between workers."""

from syncnorm.transports.base import LayerKey, LayerMismatchError, StatsReducer
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
    "TorchDistributedReducer",
    "consecutive_groups",
    "default_reducer",
]

"""Transports: how SyncBN statistics travel between workers.

``ActorReducer`` and ``start_aggregator`` (the Ray actor transport) need the
``ray`` extra; they import Ray only when used.
"""

from syncnorm.transports.base import LayerKey, LayerMismatchError, StatsReducer, SynchronizationError
from syncnorm.transports.ray_actor import ActorReducer, StatsAggregator, start_aggregator
from syncnorm.transports.torch_distributed import (
    FASTEST_PRIMITIVE,
    TorchDistributedReducer,
    consecutive_groups,
    default_reducer,
)

__all__ = [
    "FASTEST_PRIMITIVE",
    "ActorReducer",
    "LayerKey",
    "LayerMismatchError",
    "StatsAggregator",
    "StatsReducer",
    "SynchronizationError",
    "TorchDistributedReducer",
    "consecutive_groups",
    "default_reducer",
    "start_aggregator",
]

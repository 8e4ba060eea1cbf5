"""The interface between the SyncBN arithmetic and whatever moves statistics.

A transport only has to do two things per layer call, one in each direction:
merge every worker's :class:`~syncnorm.moments.Moments` (forward), and add up
a vector across workers (backward).  :class:`SyncBatchNormFunction
<syncnorm.function.SyncBatchNormFunction>` calls nothing else, so a new
transport (torch.distributed, a Ray actor, ...) never touches the math.
"""

from __future__ import annotations

import itertools
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import Tensor

from syncnorm.moments import Moments

SIGNATURE_BITS = 20
"""Signatures fit in 20 bits so that a signature, its square, and their sums
over thousands of workers stay exact integers in float64."""

_instance_ids = itertools.count()


def layer_signature(name: str, num_features: int) -> int:
    """A small integer identifying a layer the same way on every worker."""
    return zlib.crc32(f"{name}|{num_features}".encode()) & ((1 << SIGNATURE_BITS) - 1)


@dataclass(frozen=True)
class LayerKey:
    """Identifies one SyncBN layer to a transport.

    Args:
        name: the layer's qualified name in its model ("" when unknown); used
            in error messages and in the signature.
        num_features: the layer's channel count C.
        instance: a process-local id of the layer object, for per-layer
            bookkeeping inside a transport; never sent to other workers.
    """

    name: str
    num_features: int
    instance: int = field(default_factory=lambda: next(_instance_ids))

    @property
    def signature(self) -> int:
        return layer_signature(self.name, self.num_features)

    def describe(self) -> str:
        label = repr(self.name) if self.name else "<unnamed; see syncnorm.name_layers>"
        return f"SyncBatchNorm layer {label} (num_features={self.num_features})"


class LayerMismatchError(RuntimeError):
    """Workers disagree on which layer a synchronization round belongs to."""


class SynchronizationError(RuntimeError):
    """A synchronization round did not complete: a peer died, hung or never came."""


class StatsReducer(ABC):
    """Moves SyncBN statistics between the workers of one synchronization group.

    Each method is one collective round: every worker of the group must call it
    for the same layer, in the same order.  Implementations must return results
    that are identical on every worker.
    """

    @abstractmethod
    def merge_moments(self, local: Moments, layer: LayerKey) -> Moments:
        """Forward: the exact moments of the union of every worker's batch."""

    @abstractmethod
    def sum_across_workers(self, local: Tensor, layer: LayerKey) -> Tensor:
        """Backward: the elementwise sum of a 1-D tensor over all workers."""

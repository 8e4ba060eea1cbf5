"""SyncBatchNorm: the module decides, :class:`SyncBatchNormFunction` computes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm.function import SyncBatchNormFunction, compute_dtype
from syncnorm.moments import Moments, local_moments
from syncnorm.transports.base import LayerKey, StatsReducer
from syncnorm.transports.torch_distributed import default_reducer


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm whose batch statistics are those of the union of all workers' batches.

    A drop-in for ``torch.nn.BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d``:
    it accepts ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` and ``(N, C, D, H, W)``
    inputs and has the same parameters, buffers and ``state_dict`` keys, so
    checkpoints load both ways.

    There is more than one "synchronized batch norm" in the wild; this is the one
    that equals single-process batch norm on the concatenated global batch:

    * **Training**: every worker normalizes with the mean and the *biased*
      variance of the union of all workers' batches in the group, each value
      weighing the same, so a worker with twice the batch has twice the weight
      (not: every worker's statistics weighing equally).  Workers with an empty
      batch take part and contribute nothing.
    * **Running statistics** are updated on every worker with that global mean
      and the global *unbiased* variance, ``momentum`` as in torch
      (``momentum=None``: cumulative average), and ``num_batches_tracked``
      counts steps.  All workers therefore hold identical running buffers.
    * **Gradients**: the input gradient is the exact gradient through the
      global statistics; ``weight`` and ``bias`` gradients are this worker's
      share, so summing them over workers (as DDP does, up to its 1/W) gives the
      gradient of the global batch.
    * **Eval** uses the running statistics and communicates nothing; with
      ``track_running_stats=False`` it synchronizes batch statistics as in training.

    Each training call costs one collective in forward and one in backward, with
    O(C) values per worker.  The statistics are merged with Chan's exact update
    (see :mod:`syncnorm.moments`), stable for ``|mean| >> std``; half-precision
    inputs are accumulated in float32.

    Args:
        num_features: number of channels C.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as in
            ``torch.nn.BatchNorm2d``.
        process_group: synchronize only within this torch.distributed group
            (default: the whole default group).  See :func:`syncnorm.consecutive_groups`.
        reducer: a :class:`~syncnorm.transports.StatsReducer` to use instead of
            torch.distributed (e.g. a Ray actor aggregator).

    ``moment_observers`` (a list, empty by default) are called in training as
    ``observer(local, total)`` with this worker's and the group's batch
    :class:`~syncnorm.moments.Moments`; :func:`syncnorm.precise_bn` uses them.

    Without a reducer, and when torch.distributed is not initialized or the group
    has one rank, the layer is exactly ``torch.nn.BatchNorm`` on the local batch.

    Example::

        model = syncnorm.convert_sync_batchnorm(model)        # or build with SyncBatchNorm
        model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        reducer: StatsReducer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        # torch >= 2.13 accepts affine=True with bias=False; pass it only when used.
        extra = {} if bias else {"bias": False}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **extra
        )
        self.process_group = process_group
        self.reducer = reducer
        self.layer_name = ""
        self.last_input_dim: int | None = None
        self.moment_observers: list[Callable[[Moments, Moments], None]] = []
        self._layer_key: LayerKey | None = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._layer_key = None  # a copy is a different layer to the transports

    @property
    def layer_key(self) -> LayerKey:
        """How transports identify this layer; follows ``layer_name``."""
        if self._layer_key is None or self._layer_key.name != self.layer_name:
            self._layer_key = LayerKey(self.layer_name, self.num_features)
        return self._layer_key

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected 2D, 3D, 4D or 5D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self.layer_key.describe()} got an input with {input.shape[1]} channels "
                f"(input size {tuple(input.shape)}); dimension 1 must hold the channels"
            )

    def active_reducer(self) -> StatsReducer | None:
        """The transport a training call would use now; ``None`` means local batch norm."""
        if self.reducer is not None:
            return self.reducer
        return default_reducer(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self.last_input_dim = input.dim()
        uses_batch_stats = self.training or self.running_mean is None
        if not uses_batch_stats:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )

        tracks = self.training and self.track_running_stats and self.num_batches_tracked is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if tracks and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        running_mean = self.running_mean if tracks else None
        running_var = self.running_var if tracks else None

        reducer = self.active_reducer()
        if reducer is None:
            output = F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, True, factor, self.eps
            )
            if self.moment_observers:
                with torch.no_grad():
                    local = local_moments(input, compute_dtype(input))
                self._observe(local, local)
        else:
            output = SyncBatchNormFunction.apply(
                input, self.weight, self.bias, running_mean, running_var,
                self.eps, factor, reducer, self.layer_key, self._observe if self.moment_observers else None,
            )  # fmt: skip
        if tracks:
            # Counted only once the step succeeded: a rejected batch changes no state.
            self.num_batches_tracked.add_(1)
        return output

    def _observe(self, local: Moments, total: Moments) -> None:
        for observer in self.moment_observers:
            observer(local, total)

    def extra_repr(self) -> str:
        name = f", layer_name={self.layer_name!r}" if self.layer_name else ""
        return super().extra_repr() + name

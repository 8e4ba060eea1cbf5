"""Differentiable mean and variance of the global batch: the batch branch of any norm.

Batch norm is not the only layer whose statistics depend on the batch: batch-instance,
switchable, mean-only and conditional batch norm all contain a "batch branch" that,
in data-parallel training, must see every worker's batch to mean what it means on
one process.  :func:`global_batch_moments` is that branch as one differentiable
operation; the layers in :mod:`syncnorm.norms` compose it with plain autograd.

Forward (one collective)::

    (n_r, mu_r, M2_r) = moments of this worker's x               # syncnorm.moments
    (N, mu, M2)       = reducer.merge_moments(...)                # exact, count-weighted
    mean, var         = mu, M2 / N                                # biased variance

Backward (one collective).  Every worker's loss depends on the same ``mean`` and
``var``, so the gradient of the total loss with respect to them is the sum of
the workers' own gradients ``g_mean_r``, ``g_var_r``.  With ``G = sum_r g`` over
the group (:meth:`StatsReducer.sum_across_workers`)::

    dx_i = G_mean / N + G_var * 2 * (x_i - mean) / N

which is exact for uneven batches, and zero-sized for an empty one (its ``g``
are zeros, and it still takes part in both collectives).

Statistics are computed in float64 for float64 inputs and in float32 otherwise
(fp32, fp16, bf16), as :class:`syncnorm.SyncBatchNorm` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from syncnorm.function import autocast_off, check_enough_values, compute_dtype
from syncnorm.moments import Moments, local_moments
from syncnorm.transports.base import LayerKey, StatsReducer


class LocalReducer(StatsReducer):
    """A group of one worker: the unsynchronized fallback runs the same arithmetic."""

    def merge_moments(self, local: Moments, layer: LayerKey) -> Moments:
        return local

    def sum_across_workers(self, local: Tensor, layer: LayerKey) -> Tensor:
        return local


LOCAL = LocalReducer()
"""The reducer of a layer that is not synchronized (no process group, one rank)."""


@dataclass(frozen=True)
class BatchStatistics:
    """The batch branch's statistics of one layer call.

    Args:
        mean: per-channel mean of the global batch, shape ``(C,)``, differentiable.
        var: per-channel *biased* variance (what the layer normalizes with), differentiable.
        moments: the same statistics as detached :class:`~syncnorm.moments.Moments`
            (count, mean, m2), for the running statistics (unbiased variance).
    """

    mean: Tensor
    var: Tensor
    moments: Moments


class _GlobalBatchMoments(torch.autograd.Function):
    """Forward: merged mean and biased variance; backward: one summed round; see the module."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, reducer: StatsReducer, layer: LayerKey
    ) -> tuple[Tensor, Tensor, Tensor]:
        dtype = compute_dtype(x)
        with autocast_off(x.device.type):
            total = reducer.merge_moments(local_moments(x, dtype), layer)
            check_enough_values(total, x.numel() // max(x.shape[1], 1), x.shape)
            count = total.count.to(dtype)
            mean = total.mean.to(dtype)
            var = total.m2.to(dtype) / count
        ctx.save_for_backward(x, mean, count)
        ctx.reducer = reducer
        ctx.layer = layer
        ctx.mark_non_differentiable(count)
        return mean, var, count

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_mean: Tensor, grad_var: Tensor, _grad_count: Tensor
    ) -> tuple[Tensor | None, None, None]:
        x, mean, count = ctx.saved_tensors
        c = mean.numel()
        with autocast_off(x.device.type):
            local = torch.cat([grad_mean.to(mean.dtype), grad_var.to(mean.dtype)])
            total = ctx.reducer.sum_across_workers(local, ctx.layer)
            per_value = total[:c] / count
            per_deviation = total[c:] * (2.0 / count)
            shape = (1, c, *([1] * (x.dim() - 2)))
            xmu = x.to(mean.dtype) - mean.view(shape)
            grad_x = torch.addcmul(per_value.view(shape), xmu, per_deviation.view(shape))
        return grad_x.to(x.dtype), None, None


def global_batch_moments(x: Tensor, reducer: StatsReducer, layer: LayerKey) -> BatchStatistics:
    """Mean and biased variance per channel of the union of every worker's ``x``.

    ``x`` has layout ``(N, C, *)`` and may be empty on some workers; every worker
    of the group must call this for the same layer in the same order (once in
    forward, and once more in backward when ``x`` requires grad).  Raises
    ``ValueError`` like torch's batch norm when the whole group holds at most one
    value per channel.  With :data:`LOCAL` as the reducer these are the local
    batch's statistics, through the same arithmetic.
    """
    if x.dim() < 2:
        raise ValueError(
            f"{layer.describe()}: expected an input of layout (N, C, *), got shape {tuple(x.shape)}"
        )
    mean, var, count = _GlobalBatchMoments.apply(x, reducer, layer)
    detached = Moments(count, mean.detach(), var.detach() * count)
    return BatchStatistics(mean, var, detached)


def update_running_mean(running_mean: Tensor, mean: Tensor, factor: float) -> None:
    """``running = (1 - factor) * running + factor * mean``, in place (mean-only batch norm)."""
    running_mean.mul_(1.0 - factor).add_(mean.detach().to(running_mean.dtype), alpha=factor)


__all__ = [
    "LOCAL",
    "BatchStatistics",
    "LocalReducer",
    "global_batch_moments",
    "update_running_mean",
]

"""Moment arithmetic for batch statistics: pure functions, no communication.

A worker's contribution to a channel's statistics is the triple
``(count, mean, m2)``, where ``m2`` is the sum of squared deviations from the
worker's *own* mean.  Triples merge exactly with Chan et al.'s pairwise
update (Chan, Golub & LeVeque, 1979, "Updating formulae and a pairwise
algorithm for computing sample variances")::

    N  = sum_i n_i
    mu = sum_i n_i * mu_i / N
    M2 = sum_i M2_i + sum_i n_i * (mu_i - mu)**2

Why this form and not sums of ``x`` and ``x**2``: ``E[x^2] - E[x]^2`` cancels
catastrophically when ``|mean| >> std`` (fp32 data with mean 1e4 and std 1
loses every significant digit of the variance, and can even turn it negative).
Every term above is a sum of non-negative numbers or of deviations that are
already centred, so no cancellation happens.

Where a transport can only *add* tensors (an all-reduce), :func:`to_power_sums`
turns a triple into ``(n, sum x, sum x^2)`` in float64 and
:func:`from_power_sums` turns the total back.  The cancellation then costs about
``2**-52 * (mean/std)**2`` relative error in the variance, which for
``mean/std = 1e4`` is ~1e-8: below the rounding already present in fp32 data.

All functions work on any device and keep the dtype of their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Moments:
    """Per-channel first and second moments of a set of values.

    Args:
        count: number of values per channel: a 0-d tensor (the same for every
            channel), or shape ``(C,)`` where channels of several layers are laid
            side by side.
        mean: per-channel mean, shape ``(C,)``; zero where ``count == 0``.
        m2: per-channel sum of squared deviations from ``mean``, shape ``(C,)``.
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    @property
    def biased_var(self) -> Tensor:
        """Population variance ``m2 / count`` (what batch norm normalizes with)."""
        return self.m2 / self.count.clamp(min=1)

    @property
    def unbiased_var(self) -> Tensor:
        """Sample variance ``m2 / (count - 1)`` (what batch norm's running_var tracks)."""
        return self.m2 / (self.count - 1).clamp(min=1)


def reduction_dims(x: Tensor) -> list[int]:
    """The dimensions batch norm reduces over: all but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def local_moments(x: Tensor, dtype: torch.dtype) -> Moments:
    """Moments of each channel of ``x`` (layout ``(N, C, *)``), computed in ``dtype``.

    For inputs already in ``dtype`` this is ``torch.batch_norm_update_stats``,
    the statistics pass of torch's own batch norm kernels (CPU and CUDA, any
    memory format; it accumulates deviations from the mean, so ``m2`` stays
    accurate when ``|mean| >> std``) and several times faster than
    ``torch.var_mean`` over the same dimensions.  Other inputs are converted to
    ``dtype`` first.  An empty batch gives ``count = 0`` and zero mean and m2,
    which merge as a no-op.
    """
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=dtype, device=x.device)
        return Moments(torch.zeros((), dtype=dtype, device=x.device), zeros, zeros.clone())
    mean, var = torch.batch_norm_update_stats(x.to(dtype), None, None, 0.0)
    n = torch.full((), float(count), dtype=dtype, device=x.device)
    return Moments(n, mean, var * n)


def merge_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> Moments:
    """Merge per-worker moments exactly (Chan et al.).

    Args:
        counts: shape ``(W,)``, each worker's count; or ``(W, C)`` where the
            count differs by channel (the coordinator merges many layers at once).
        means: shape ``(W, C)``, each worker's per-channel mean.
        m2s: shape ``(W, C)``, each worker's per-channel sum of squared deviations.

    Returns:
        The moments of the union of all workers' values.  Workers with
        ``count == 0`` contribute nothing; if every count is zero the result has
        ``count == 0`` and zero mean and m2.
    """
    total = counts.sum(0)
    weights = counts / total.clamp(min=torch.finfo(counts.dtype).tiny)
    if counts.dim() == 1:
        mean = weights @ means
        m2 = m2s.sum(0) + counts @ (means - mean).square()
    else:
        mean = (weights * means).sum(0)
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return Moments(total, mean, m2)


def merge_into(total: Moments, batch: Moments) -> None:
    """Merge ``batch`` into ``total`` in place (e.g. a running total and a new batch).

    Chan et al.'s pairwise form of :func:`merge_moments`, without stacking or new
    state: with ``delta = mu_b - mu_a``, ``N = n_a + n_b``,
    ``mu = mu_a + delta * n_b / N`` and ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / N``.
    ``total``'s tensors are overwritten; counts of both must have the same shape
    (0-d, or per channel).
    """
    count = total.count + batch.count
    share = batch.count / count.clamp(min=torch.finfo(count.dtype).tiny)  # n_b / N
    delta = batch.mean - total.mean
    total.mean.addcmul_(delta, share)
    total.m2.add_(batch.m2).addcmul_(delta.square_(), share.mul_(total.count))  # n_a * n_b / N
    total.count.copy_(count)


def to_power_sums(m: Moments) -> tuple[Tensor, Tensor, Tensor]:
    """``(n, sum x, sum x^2)`` per channel, for transports that can only add."""
    return m.count, m.count * m.mean, m.m2 + m.count * m.mean.square()


def from_power_sums(count: Tensor, total: Tensor, total_sq: Tensor) -> Moments:
    """Inverse of :func:`to_power_sums` applied to summed power sums."""
    mean = total / count.clamp(min=torch.finfo(total.dtype).tiny)
    m2 = (total_sq - total * mean).clamp(min=0)
    return Moments(count, mean, m2)


def update_running_stats(running_mean: Tensor, running_var: Tensor, batch: Moments, factor: float) -> None:
    """Exponential update of batch norm's running buffers, in place, as torch does it.

    ``running = (1 - factor) * running + factor * batch``, with the *unbiased*
    batch variance, which is what ``torch.nn.BatchNorm`` stores.  ``factor`` is
    the momentum, or ``1 / num_batches_tracked`` for a cumulative average.
    """
    running_mean.lerp_(batch.mean.to(running_mean.dtype), factor)
    running_var.lerp_(batch.unbiased_var.to(running_var.dtype), factor)

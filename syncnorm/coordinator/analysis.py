"""The coordinator's arithmetic on reported statistics: pure functions on tensors.

Definitions (the metrics and ``syncnorm status`` use exactly these):

* **Drift** of worker w in a layer: ``mean_c |mu_w,c - mu_g,c| / sqrt(var_g,c + eps)``,
  the standardized mean shift, so a worker whose inputs are shifted by k
  global standard deviations reads about k.  ``mu_g``/``var_g`` are the merged
  (count-weighted) statistics of the same step's reports.
* **Log variance ratio**: ``mean_c log((var_w,c + eps) / (var_g,c + eps))``; 0 when
  the worker's spread matches the group's, log 4 when its std is twice as large.
* **Batch-size mismatch ratio**: largest / smallest batch size among live
  workers; 1 is balanced, infinite when a live worker reports an empty batch.
* **Running-stats divergence**: over layers, the largest
  ``mean_c |rm_w,c - rm_avg,c| / sqrt(rv_avg,c + eps)`` over workers, i.e. the
  drift of each worker's running mean from the workers' average, in units of the
  average running std.  SyncBN keeps it at 0; per-worker BN lets it grow.
* **Recommended batch sizes**: shares of the global batch proportional to each
  worker's measured throughput (batch size / step time), rounded by largest
  remainder so that they add up to the global batch, each at least 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from syncnorm.moments import Moments, merge_moments

EPS = 1e-5


def merge_reports(counts: Tensor, means: Tensor, variances: Tensor) -> Moments:
    """The exact moments of the union of the workers' reported batches.

    Args:
        counts: ``(W,)`` values per channel in each worker's batch, or ``(W, C)``
            when the channels belong to layers of different counts.
        means: ``(W, C)`` per-channel means.
        variances: ``(W, C)`` per-channel biased variances.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    means, variances = torch.as_tensor(means).double(), torch.as_tensor(variances).double()
    m2 = variances * (counts[:, None] if counts.dim() == 1 else counts)
    return merge_moments(counts, means, m2)


def standardized_shift(
    worker_mean: Tensor, global_mean: Tensor, global_var: Tensor, eps: float = EPS
) -> Tensor:
    """Per channel ``|mu_w - mu_g| / sqrt(var_g + eps)``; a layer's drift is its mean over channels."""
    return (worker_mean - global_mean).abs() / (global_var + eps).sqrt()


def log_var_ratios(worker_var: Tensor, global_var: Tensor, eps: float = EPS) -> Tensor:
    """Per channel ``log((var_w + eps) / (var_g + eps))``; the log variance ratio is its mean."""
    return ((worker_var + eps) / (global_var + eps)).log()


def batch_size_mismatch_ratio(batch_sizes: Sequence[int]) -> float:
    if not batch_sizes:
        return 1.0
    smallest, largest = min(batch_sizes), max(batch_sizes)
    if smallest <= 0:
        return math.inf if largest > 0 else 1.0
    return largest / smallest


def running_mean_spread(
    running_means: Tensor, running_vars: Tensor, present: Tensor | None = None, eps: float = EPS
) -> Tensor:
    """``(W, C)``: each worker's ``|rm_w,c - rm_avg,c| / sqrt(rv_avg,c + eps)``.

    ``present`` (``(W, C)`` bool) marks the workers that hold buffers for a
    channel; the averages are over those, and absent entries read 0.
    """
    means, variances = running_means.double(), running_vars.double()
    if present is None:
        present = torch.ones_like(means, dtype=torch.bool)
    weight = present.double()
    holders = weight.sum(0).clamp(min=1)
    average = torch.where(present, means, 0.0).sum(0) / holders
    scale = (torch.where(present, variances, 0.0).sum(0) / holders + eps).sqrt()
    return torch.where(present, (means - average).abs() / scale, 0.0)


def recommend_batch_sizes(
    batch_sizes: Mapping[str, int], step_times: Mapping[str, float], global_batch: int | None = None
) -> dict[str, int]:
    """Batch sizes proportional to throughput that add up to ``global_batch``
    (default: the current sum).  Workers without a usable step time keep the
    average throughput of the others."""
    workers = sorted(batch_sizes)
    if not workers:
        return {}
    total = sum(batch_sizes.values()) if global_batch is None else global_batch
    if total < len(workers):
        raise ValueError(
            f"a global batch of {total} cannot give {len(workers)} workers at least 1 sample each"
        )
    rates = {
        w: batch_sizes[w] / step_times[w] for w in workers if step_times.get(w, 0) > 0 and batch_sizes[w] > 0
    }
    fallback = sum(rates.values()) / len(rates) if rates else 1.0
    throughput = {w: rates.get(w, fallback) for w in workers}
    spare = total - len(workers)  # everyone gets 1, the rest by throughput
    ideal = {w: spare * throughput[w] / sum(throughput.values()) for w in workers}
    sizes = {w: 1 + math.floor(ideal[w]) for w in workers}
    leftover = total - sum(sizes.values())
    for w in sorted(workers, key=lambda w: (ideal[w] - math.floor(ideal[w]), w), reverse=True)[:leftover]:
        sizes[w] += 1
    return sizes


def ema_update(previous: Tensor | None, value: Tensor, momentum: float) -> Tensor:
    """``(1 - momentum) * previous + momentum * value``; the first value starts it."""
    if not 0 < momentum <= 1:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    value = value.double()
    return value.clone() if previous is None else previous.lerp(value, momentum)

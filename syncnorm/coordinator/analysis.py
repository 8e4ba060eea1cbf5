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


def merge_reports(counts: Sequence[float], means: Sequence[Tensor], variances: Sequence[Tensor]) -> Moments:
    """The exact moments of the union of the workers' reported batches of one layer
    (each report: count, per-channel mean, biased variance)."""
    count = torch.tensor(counts, dtype=torch.float64)
    mean = torch.stack([m.double() for m in means])
    m2 = torch.stack([v.double() for v in variances]) * count[:, None]
    return merge_moments(count, mean, m2)


def stats_drift(worker_mean: Tensor, global_mean: Tensor, global_var: Tensor, eps: float = EPS) -> float:
    return float(((worker_mean - global_mean).abs() / (global_var + eps).sqrt()).mean())


def log_var_ratio(worker_var: Tensor, global_var: Tensor, eps: float = EPS) -> float:
    return float(((worker_var + eps) / (global_var + eps)).log().mean())


def batch_size_mismatch_ratio(batch_sizes: Sequence[int]) -> float:
    if not batch_sizes:
        return 1.0
    smallest, largest = min(batch_sizes), max(batch_sizes)
    if smallest <= 0:
        return math.inf if largest > 0 else 1.0
    return largest / smallest


def running_stats_divergence(
    running_means: Sequence[Tensor], running_vars: Sequence[Tensor], eps: float = EPS
) -> float:
    """For one layer: the largest standardized distance of a worker's running mean
    from the workers' average (see the module docstring)."""
    if len(running_means) < 2:
        return 0.0
    means = torch.stack([m.double() for m in running_means])
    scale = (torch.stack([v.double() for v in running_vars]).mean(0) + eps).sqrt()
    return float(((means - means.mean(0)).abs() / scale).mean(1).max())


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
    return value.clone() if previous is None else previous * (1 - momentum) + value * momentum

"""What the coordinator knows about each run.

Global statistics of a layer are the exact merge of the latest report of every
live worker (count-weighted); the cumulative estimate merges every accepted
report; the EMA takes, step by step, the exact merge of the reports of each
reported step (the step's global batch), the way ``torch.nn.BatchNorm``'s
running buffers take a batch.  Reports arrive checked (:mod:`.report`) and are
laid out in the run's :class:`~syncnorm.coordinator.layout.Layout`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from syncnorm.coordinator import analysis
from syncnorm.coordinator.layout import Layout
from syncnorm.coordinator.report import Report
from syncnorm.moments import Moments, merge_into


@dataclass
class WorkerRecord:
    """A worker's latest report, laid out in its run's :class:`Layout`.

    ``count`` is 0 and ``present`` False in layers the report did not carry.
    """

    report: Report
    last_seen: float
    present: Tensor
    count: Tensor
    mean: Tensor
    var: Tensor
    running_mean: Tensor
    running_var: Tensor

    @classmethod
    def place(cls, report: Report, last_seen: float, layout: Layout) -> WorkerRecord:
        if report.layout == layout:
            present = torch.ones(len(layout.names), dtype=torch.bool)
            return cls(report, last_seen, present, report.count, report.mean, report.var,
                       report.running_mean, report.running_var)  # fmt: skip
        layers, channels = layout.positions(report.layout)
        present = torch.zeros(len(layout.names), dtype=torch.bool)
        present[layers] = True
        count = torch.zeros(len(layout.names), dtype=torch.float64)
        count[layers] = report.count
        placed = []
        for values, fill in ((report.mean, 0.0), (report.var, 0.0), (report.running_mean, math.nan),
                             (report.running_var, math.nan)):  # fmt: skip
            out = torch.full((layout.size,), fill, dtype=torch.float64)
            out[channels] = values
            placed.append(out)
        return cls(report, last_seen, present, count, *placed)


@dataclass(frozen=True)
class Snapshot:
    """A run's analysis at one moment, computed once for every metric that reads it.

    Args:
        layout: the run's layers.
        merged: exact moments of the latest reports of the live workers, per
            channel (``count`` is per channel too).
        reported: ``(L,)`` whether any live worker reported the layer.
        workers: every worker of the run (live and stale), sorted.
        live: ``(W,)`` which of ``workers`` are live.
        drift: ``(W, L)`` each worker's drift in each layer; NaN where it sent
            no values for the layer (absent or empty batch) or nobody live did.
        log_var_ratio: ``(W, L)`` likewise.
        divergence: running-stats divergence of the live workers.
    """

    layout: Layout
    merged: Moments
    reported: Tensor
    workers: tuple[str, ...]
    live: Tensor
    drift: Tensor
    log_var_ratio: Tensor
    divergence: float

    def worker_drift(self, worker_id: str) -> tuple[float, float]:
        """(max over layers of the drift, max over layers of |log variance ratio|), 0 if none."""
        i = self.workers.index(worker_id)
        return _nanmax(self.drift[i]), _nanmax(self.log_var_ratio[i].abs())

    def layer_drift(self) -> dict[str, float]:
        """Per layer some live worker reported, the largest drift over live workers."""
        live = self.drift[self.live]
        return {
            name: _nanmax(live[:, i]) for i, name in enumerate(self.layout.names) if bool(self.reported[i])
        }


def _nanmax(values: Tensor) -> float:
    values = values[~values.isnan()]
    return float(values.max()) if values.numel() else 0.0


OPEN_STEPS = 4
"""Reported steps whose merged reports wait before they enter the cumulative
estimate and the EMA, so that a worker's report that arrives after another
worker's report of a later step still joins its own step.  A report of an older
step reaches the cumulative estimate and the per-worker metrics, not the EMA.
Reads see the open steps as if they had been taken in."""


@dataclass
class Estimates:
    """A run's global statistics over every report, per layer that had values.

    Args:
        cumulative: every accepted report merged exactly (count-weighted).
        ema: ``(mean, unbiased variance)``, the EMA of each reported step's
            global batch statistics (the step's reports merged), taken in step
            order as ``torch.nn.BatchNorm`` takes batches; the first step starts it.
    """

    cumulative: dict[str, Moments] = field(default_factory=dict)
    ema: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def _ema_step(
    ema: tuple[Tensor, Tensor, Tensor], step: Moments, momentum: float, layout: Layout
) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, unbiased var, started (L,))`` after one step's merged moments: in the
    layers the step has values for, both move by ``momentum`` towards the step's
    mean and unbiased variance (BatchNorm's rule); a layer's first step starts it."""
    mean, var, started = ema
    with_values = layout.at_layer_starts(step.count) > 0  # (L,)
    if bool(with_values.all()) and bool(started.all()):  # the steady state
        return (analysis.ema_update(mean, step.mean, momentum),
                analysis.ema_update(var, step.unbiased_var, momentum), started)  # fmt: skip
    update, first = layout.per_channel(with_values), layout.per_channel(~started)

    def move(old: Tensor, new: Tensor) -> Tensor:
        return torch.where(update, torch.where(first, new, analysis.ema_update(old, new, momentum)), old)

    return move(mean, step.mean), move(var, step.unbiased_var), started | with_values


@dataclass
class RunState:
    """One run: its workers' latest reports and its global statistics.

    Args:
        run_id: the run.
        momentum: EMA momentum of the global statistics.
        stale_after_s: a worker without a report for this long is stale (not live).
    """

    run_id: str
    momentum: float = 0.1
    stale_after_s: float = 60.0
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    layout: Layout = field(default_factory=Layout)
    reports: int = 0
    latest_step: int = -1
    cumulative_moments: Moments = field(default_factory=lambda: _empty_moments(0))
    ema_mean: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    ema_var: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    ema_started: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    open_steps: dict[int, Moments] = field(default_factory=dict)
    """The newest reported steps (at most ``OPEN_STEPS``), each its reports merged,
    not yet in ``cumulative_moments`` and the EMA."""
    folded_through: int = -1
    """The newest step in ``cumulative_moments`` and the EMA."""

    def channels(self) -> Mapping[str, int]:
        return self.layout.channel_counts

    def apply(self, report: Report, now: float | None = None) -> bool:
        """Take a validated report (see :func:`parse_report`).  Returns whether
        ``cumulative_moments`` and the EMA changed (a step left the open steps, or the
        report's step had); otherwise only the report's open step did."""
        now = time.time() if now is None else now
        self.reports += 1
        self.latest_step = max(self.latest_step, report.step)
        batch = self._place(report, now)
        if report.step <= self.folded_through:  # its step left the open steps: not in the EMA
            merge_into(self.cumulative_moments, batch)
            return True
        self._join_step(report.step, batch)
        folded = len(self.open_steps) > OPEN_STEPS
        while len(self.open_steps) > OPEN_STEPS:
            oldest = min(self.open_steps)
            self.cumulative_moments, ema = self._folded(oldest)
            self.ema_mean, self.ema_var, self.ema_started = ema
            del self.open_steps[oldest]
            self.folded_through = oldest
        return folded

    def replay(self, report: Report, last_seen: float) -> None:
        """Take a stored report again, after a restart, in the order they came: it
        becomes its worker's latest and rejoins its step if that step is open.  The
        counters, cumulative moments and EMA are restored as they were stored."""
        batch = self._place(report, last_seen)
        if report.step > self.folded_through:
            self._join_step(report.step, batch)

    def _place(self, report: Report, now: float) -> Moments:
        """Make ``report`` its worker's latest; its moments in the run's layout."""
        self.grow(report.layout)
        record = WorkerRecord.place(report, now, self.layout)
        self.workers[report.worker_id] = record
        count = self.layout.per_channel(record.count)
        return Moments(count, record.mean, record.var * count)

    def _join_step(self, step: int, batch: Moments) -> None:
        total = self.open_steps.get(step)
        if total is None:
            self.open_steps[step] = Moments(batch.count, batch.mean.clone(), batch.m2)
        else:
            merge_into(total, batch)

    def _folded(self, through: float) -> tuple[Moments, tuple[Tensor, Tensor, Tensor]]:
        """The cumulative moments and the EMA ``(mean, var, started)`` with the open
        steps up to ``through`` taken in, in step order; the state is left as it is."""
        c = self.cumulative_moments
        cumulative = Moments(c.count.clone(), c.mean.clone(), c.m2.clone())
        ema = (self.ema_mean, self.ema_var, self.ema_started)
        for step in sorted(s for s in self.open_steps if s <= through):
            merge_into(cumulative, self.open_steps[step])
            ema = _ema_step(ema, self.open_steps[step], self.momentum, self.layout)
        return cumulative, ema

    def estimates(self) -> Estimates:
        """The run's global statistics over every report so far (open steps included)."""
        cumulative, (mean, var, started) = self._folded(math.inf)
        counts = self.layout.at_layer_starts(cumulative.count)
        estimates = Estimates()
        for name, count, ema_started in zip(self.layout.names, counts, started.tolist(), strict=True):
            part = self.layout.slice(name)
            if count > 0:
                estimates.cumulative[name] = Moments(count, cumulative.mean[part], cumulative.m2[part])
            if ema_started:
                estimates.ema[name] = (mean[part], var[part])
        return estimates

    def cumulative(self, layer: str) -> Moments | None:
        """:attr:`Estimates.cumulative` of one layer; None before it had values."""
        return self.estimates().cumulative.get(layer)

    def ema(self, layer: str) -> tuple[Tensor, Tensor] | None:
        """:attr:`Estimates.ema` of one layer; None before it had values."""
        return self.estimates().ema.get(layer)

    def live(self, now: float | None = None) -> dict[str, WorkerRecord]:
        now = time.time() if now is None else now
        return {w: r for w, r in self.workers.items() if now - r.last_seen <= self.stale_after_s}

    def global_stats(self, layer: str, now: float | None = None) -> Moments | None:
        """The merge of the latest report of every live worker for ``layer``."""
        merged, reported = self._merge_live(now)
        i = self.layout.index[layer]
        if not bool(reported[i]):
            return None
        part = self.layout.slice(layer)
        return Moments(merged.count[part.start], merged.mean[part], merged.m2[part])

    def snapshot(self, now: float | None = None) -> Snapshot:
        """Everything the metrics and ``ListWorkers`` read, computed in one pass."""
        now = time.time() if now is None else now
        merged, reported = self._merge_live(now)
        layout = self.layout
        names = tuple(sorted(self.workers))
        records = [self.workers[w] for w in names]
        live_ids = self.live(now)
        live = torch.tensor([w in live_ids for w in names], dtype=torch.bool)
        width = len(layout.names)
        if records:
            means = torch.stack([r.mean for r in records])
            variances = torch.stack([r.var for r in records])
            sent = torch.stack([r.present & (r.count > 0) for r in records]) & reported
            global_var = merged.biased_var
            drift = layout.layer_mean(analysis.standardized_shift(means, merged.mean, global_var))
            ratio = layout.layer_mean(analysis.log_var_ratios(variances, global_var))
            drift = torch.where(sent, drift, math.nan)
            ratio = torch.where(sent, ratio, math.nan)
        else:
            drift = ratio = torch.zeros((0, width), dtype=torch.float64)
        return Snapshot(layout, merged, reported, names, live, drift, ratio,
                        self._divergence([self.workers[w] for w in names if w in live_ids]))  # fmt: skip

    def drift(self, worker_id: str, now: float | None = None) -> tuple[float, float]:
        """(max over layers of the drift, max over layers of |log variance ratio|) of a worker."""
        return self.snapshot(now).worker_drift(worker_id)

    def layer_drift(self, now: float | None = None) -> dict[str, float]:
        """Per layer, the largest drift over live workers."""
        return self.snapshot(now).layer_drift()

    def running_stats_divergence(self, now: float | None = None) -> float:
        return self._divergence(list(self.live(now).values()))

    def batch_sizes(self, now: float | None = None) -> dict[str, int]:
        return {w: r.report.batch_size for w, r in self.live(now).items()}

    def recommendations(self, global_batch: int | None = None, now: float | None = None) -> dict[str, int]:
        live = self.live(now)
        return analysis.recommend_batch_sizes(
            {w: r.report.batch_size for w, r in live.items()},
            {w: r.report.step_time_seconds for w, r in live.items()},
            global_batch,
        )

    def _merge_live(self, now: float | None) -> tuple[Moments, Tensor]:
        records = list(self.live(now).values())
        if not records:
            return _empty_moments(self.layout.size), torch.zeros(len(self.layout.names), dtype=torch.bool)
        counts = self.layout.per_channel(torch.stack([r.count for r in records]))
        merged = analysis.merge_reports(counts, torch.stack([r.mean for r in records]),
                                        torch.stack([r.var for r in records]))  # fmt: skip
        reported = torch.stack([r.present for r in records]).any(0)
        return merged, reported

    def _divergence(self, records: list[WorkerRecord]) -> float:
        if len(records) < 2:
            return 0.0
        means = torch.stack([r.running_mean for r in records])
        variances = torch.stack([r.running_var for r in records])
        present = ~means.isnan()
        spread = self.layout.layer_mean(analysis.running_mean_spread(means, variances, present))
        has = self.layout.layer_mean(present.double()) > 0  # (W, L): the worker sent buffers
        enough = has.sum(0) >= 2
        return _nanmax(torch.where(has & enough, spread, math.nan))

    def grow(self, layout: Layout) -> None:
        """Make room for ``layout``'s layers this run has not seen (appended, with no values)."""
        grown = self.layout.extended(layout)
        if grown is self.layout:
            return
        old, extra = self.layout, grown.size - self.layout.size
        new_layers = len(grown.names) - len(old.names)

        def pad(t: Tensor, n: int, fill: float | bool) -> Tensor:
            return torch.cat([t, torch.full((n,), fill, dtype=t.dtype)])

        c = self.cumulative_moments
        self.cumulative_moments = Moments(
            pad(c.count, extra, 0.0), pad(c.mean, extra, 0.0), pad(c.m2, extra, 0.0)
        )
        self.ema_mean, self.ema_var = pad(self.ema_mean, extra, 0.0), pad(self.ema_var, extra, 0.0)
        self.ema_started = pad(self.ema_started, new_layers, False)
        self.open_steps = {
            step: Moments(pad(m.count, extra, 0.0), pad(m.mean, extra, 0.0), pad(m.m2, extra, 0.0))
            for step, m in self.open_steps.items()
        }
        for r in self.workers.values():
            r.present, r.count = pad(r.present, new_layers, False), pad(r.count, new_layers, 0.0)
            r.mean, r.var = pad(r.mean, extra, 0.0), pad(r.var, extra, 0.0)
            r.running_mean, r.running_var = (
                pad(r.running_mean, extra, math.nan),
                pad(r.running_var, extra, math.nan),
            )
        self.layout = grown


def _empty_moments(size: int) -> Moments:
    zeros = torch.zeros(size, dtype=torch.float64)
    return Moments(zeros, zeros.clone(), zeros.clone())

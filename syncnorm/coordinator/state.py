"""What the coordinator knows about each run, and the checks a report must pass.

A report is validated completely before it touches any state: a rejected report
changes nothing.  Global statistics of a layer are the exact merge of the
latest report of every live worker (count-weighted); the cumulative estimate
merges every accepted report; the EMA takes, step by step, the exact merge of
the reports of each reported step (the step's global batch), the way
``torch.nn.BatchNorm``'s running buffers take a batch.

All statistics of a run sit in flat per-channel arrays, the layers side by
side in a :class:`Layout`, so that taking a report or computing every metric
is a few vectorized operations however many layers a model has.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from syncnorm.coordinator import analysis
from syncnorm.moments import Moments, merge_into

MAX_LAYERS = 1024
MAX_CHANNELS = 65_536
MAX_ID_LENGTH = 128
MAX_MAGNITUDE = 1e60
"""Reported values beyond this are refused: their squares and sums must stay finite."""


class InvalidReport(ValueError):
    """A report that was refused; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


REJECTION_REASONS = (
    "bad_id", "negative", "bad_step_time", "too_many_layers", "bad_layer_name", "bad_shape", "shape_changed",
    "not_finite", "too_large",
)  # fmt: skip
"""Every :class:`InvalidReport` reason.  The metrics export each one from 0, so that
the first rejection is an increase that ``increase()`` and alerts can see."""


@dataclass(frozen=True)
class Layout:
    """Where each layer's channels sit in a flat per-channel array.

    Layer ``i`` owns ``channels[i]`` consecutive entries starting at ``offsets[i]``.
    """

    names: tuple[str, ...] = ()
    channels: tuple[int, ...] = ()

    @cached_property
    def size(self) -> int:
        return sum(self.channels)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        starts = [0]
        for c in self.channels[:-1]:
            starts.append(starts[-1] + c)
        return tuple(starts) if self.channels else ()

    @cached_property
    def channel_counts(self) -> dict[str, int]:
        return dict(zip(self.names, self.channels, strict=True))

    @cached_property
    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    @cached_property
    def layer_of_channel(self) -> Tensor:
        """``(C,)``: the layer index of every channel."""
        return torch.repeat_interleave(
            torch.arange(len(self.names)), torch.tensor(self.channels, dtype=torch.long)
        )

    @cached_property
    def offset_index(self) -> Tensor:
        """``(L,)``: ``offsets`` as an index tensor."""
        return torch.tensor(self.offsets, dtype=torch.long)

    def at_layer_starts(self, per_channel: Tensor) -> Tensor:
        """``(..., C) -> (..., L)``: each layer's first channel (for values that are
        the same over a layer's channels, such as counts)."""
        return per_channel[..., self.offset_index]

    def per_channel(self, per_layer: Tensor) -> Tensor:
        """``(..., L) -> (..., C)``: each layer's value repeated over its channels."""
        return per_layer.index_select(-1, self.layer_of_channel)

    def layer_mean(self, per_channel: Tensor) -> Tensor:
        """``(..., C) -> (..., L)``: the mean over each layer's channels."""
        sums = per_channel.new_zeros((*per_channel.shape[:-1], len(self.names)))
        sums.index_add_(-1, self.layer_of_channel, per_channel)
        return sums / torch.tensor(self.channels, dtype=per_channel.dtype)

    def slice(self, name: str) -> slice:
        i = self.index[name]
        return slice(self.offsets[i], self.offsets[i] + self.channels[i])

    def extended(self, other: Layout) -> Layout:
        """This layout with ``other``'s unknown layers appended."""
        new = [(n, c) for n, c in zip(other.names, other.channels, strict=True) if n not in self.index]
        if not new:
            return self
        return Layout(self.names + tuple(n for n, _ in new), self.channels + tuple(c for _, c in new))

    def positions(self, other: Layout) -> tuple[Tensor, Tensor]:
        """Indices in this layout of ``other``'s layers ``(L_other,)`` and channels
        ``(C_other,)``; every layer of ``other`` must be here."""
        layers = torch.tensor([self.index[n] for n in other.names], dtype=torch.long)
        starts = self.offset_index[layers]
        within = torch.arange(other.size) - other.offset_index[other.layer_of_channel]
        return layers, starts[other.layer_of_channel] + within


@dataclass(frozen=True)
class Report:
    """A validated worker report (the protobuf message, checked and converted).

    Per-layer values are ``(L,)`` and per-channel values ``(C,)`` float64
    tensors in ``layout``'s order.  ``running_mean``/``running_var`` are NaN in
    layers that sent no running buffers.
    """

    run_id: str
    worker_id: str
    step: int
    device_kind: str
    batch_size: int
    step_time_seconds: float
    layout: Layout
    count: Tensor
    mean: Tensor
    var: Tensor
    running_mean: Tensor
    running_var: Tensor

    @property
    def layers(self) -> tuple[str, ...]:
        return self.layout.names


_BLOCKS = ("mean", "var", "running_mean", "running_var")
"""The per-channel blocks of a report, in the row order of :class:`_Layers` ``values``."""


def _check_layers(names: Sequence[str], channels: Sequence[int], counts: Sequence[float],
                  known: Mapping[str, int]) -> None:  # fmt: skip
    """Refuse bad layer names, channel counts that are out of range or changed since
    the layer's first report, and counts that are negative or not finite."""
    usual = tuple(known) == tuple(names) and tuple(known.values()) == tuple(channels)
    if not usual:  # the run's layers exactly were checked when they first came
        _check_new_layers(names, channels, known)
    values = np.asarray(counts, dtype=np.float64)
    bad = ~((values >= 0) & (values <= MAX_MAGNITUDE))  # NaN compares false
    if bad.any():
        name = names[int(np.argmax(bad))]
        raise InvalidReport("negative", f"layer {name!r}: count must be finite and >= 0")


def _check_new_layers(names: Sequence[str], channels: Sequence[int], known: Mapping[str, int]) -> None:
    if len(set(names)) != len(names) or not all(0 < len(n) <= 2 * MAX_ID_LENGTH for n in names):
        seen: set[str] = set()
        for name in names:  # name the first offender
            if not 0 < len(name) <= 2 * MAX_ID_LENGTH or name in seen:
                raise InvalidReport("bad_layer_name", f"layer names must be unique and non-empty: {name!r}")
            seen.add(name)
    sizes = np.asarray(channels, dtype=np.int64)
    bad = (sizes <= 0) | (sizes > MAX_CHANNELS)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidReport(
            "bad_shape", f"layer {names[i]!r}: needs 1..{MAX_CHANNELS} channels, got {channels[i]}"
        )
    for name, c in zip(names, channels, strict=True):
        expected = known.get(name)
        if expected is not None and expected != c:
            raise InvalidReport("shape_changed", f"layer {name!r} had {expected} channels, now {c}")


def _check_values(values: np.ndarray, layout: Layout) -> None:
    """Refuse non-finite, huge, or (for variances) negative values, naming the block
    and the layer.  ``values``: ``(4, C)``, the rows in ``_BLOCKS`` order."""
    if values.size:
        highest, lowest = values.max(axis=1), values.min(axis=1)  # NaN propagates into both
        if (highest <= MAX_MAGNITUDE).all() and (lowest >= -MAX_MAGNITUDE).all() and min(lowest[[1, 3]]) >= 0:
            return  # the common case: one pass, nothing to report

    def layer(bad: np.ndarray) -> str:
        return layout.names[int(layout.layer_of_channel[int(np.argmax(bad))])]

    for what, row in zip(_BLOCKS, values, strict=True):
        bad = ~np.isfinite(row)
        if bad.any():
            raise InvalidReport("not_finite", f"layer {layer(bad)!r}: {what} has NaN or infinite values")
        bad = np.abs(row) > MAX_MAGNITUDE
        if bad.any():
            raise InvalidReport(
                "too_large", f"layer {layer(bad)!r}: {what} has values beyond {MAX_MAGNITUDE:g}"
            )
        if what.endswith("var"):
            bad = row < 0
            if bad.any():
                raise InvalidReport("negative", f"layer {layer(bad)!r}: {what} must be >= 0")


@dataclass
class _Layers:
    """A report's layers before the value checks: per layer its name, channels,
    count and whether it sent running buffers; ``values`` ``(4, C)`` holds the
    blocks of ``_BLOCKS`` side by side (zeros where a layer sent no running buffers)."""

    names: list[str]
    channels: list[int]
    counts: list[float]
    sent_running: np.ndarray
    values: np.ndarray


def _from_layer_messages(layers: Sequence[Any], known: Mapping[str, int]) -> _Layers:
    names, channels, counts, sent_running = [], [], [], []
    for layer in layers:
        c = len(layer.mean)
        if len(layer.var) != c:
            raise InvalidReport("bad_shape", f"layer {layer.layer!r}: mean and var need the same length")
        has_running = len(layer.running_mean)
        if has_running not in (0, c) or len(layer.running_var) != has_running:
            raise InvalidReport(
                "bad_shape",
                f"layer {layer.layer!r}: running_mean and running_var must both be empty or have {c} values",
            )
        names.append(layer.layer)
        channels.append(c)
        counts.append(layer.count)
        sent_running.append(bool(has_running))
    _check_layers(names, channels, counts, known)
    values = np.zeros((len(_BLOCKS), sum(channels)))
    start = 0
    for layer, c, has_running in zip(layers, channels, sent_running, strict=True):
        for row, block in enumerate(_BLOCKS if has_running else _BLOCKS[:2]):
            # numpy reads protobuf's repeated doubles ~30x faster than a Python list does
            values[row, start : start + c] = np.array(getattr(layer, block), dtype=np.float64)
        start += c
    return _Layers(names, channels, counts, np.array(sent_running, dtype=bool), values)


_PACKED_VALUE_TYPES = {0: np.dtype("<f8"), 1: np.dtype("<f4")}
"""``PackedLayerStats.ValueType`` -> how its blocks read."""


def _from_packed(packed: Any, known: Mapping[str, int]) -> _Layers:
    names, channels, counts = list(packed.layer), list(packed.channels), list(packed.count)
    if not len(names) == len(channels) == len(counts):
        raise InvalidReport(
            "bad_shape",
            f"packed: {len(names)} layer names, {len(channels)} channel counts, {len(counts)} counts",
        )
    value_type = _PACKED_VALUE_TYPES.get(packed.value_type)
    if value_type is None:
        raise InvalidReport(
            "bad_shape", f"packed value_type {packed.value_type} is not float64 (0) or float32 (1)"
        )
    _check_layers(names, channels, counts, known)
    size = sum(channels)
    has_running = len(packed.running_mean) > 0
    values = np.empty((len(_BLOCKS), size))
    for row, block in enumerate(_BLOCKS):
        raw = getattr(packed, block)
        wanted = value_type.itemsize * size if has_running or not block.startswith("running") else 0
        if len(raw) != wanted:
            raise InvalidReport(
                "bad_shape",
                f"packed {block}: {len(raw)} bytes, expected {wanted} ({value_type.itemsize} per channel)",
            )
        values[row] = np.frombuffer(raw, dtype=value_type) if wanted else 0.0
    return _Layers(names, channels, counts, np.full(len(names), has_running), values)


def parse_report(message: object, known_channels: Mapping[str, int] | None = None) -> Report:
    """Check a ``ReportRequest`` and convert it; raises :class:`InvalidReport`.

    The layers come either as ``LayerStats`` messages or as one
    ``PackedLayerStats``; both give the same :class:`Report`.
    ``known_channels``: the channel count of each layer as first reported in
    this run; a later report must agree.
    """
    m = message  # a syncnorm.coordinator.v1.coordinator_pb2.ReportRequest
    for name in ("run_id", "worker_id"):
        value = getattr(m, name)
        if not value or len(value) > MAX_ID_LENGTH:
            raise InvalidReport("bad_id", f"{name} must have 1 to {MAX_ID_LENGTH} characters")
    if m.step < 0 or m.batch_size < 0:
        raise InvalidReport("negative", "step and batch_size must be >= 0")
    if not math.isfinite(m.step_time_seconds) or m.step_time_seconds < 0:
        raise InvalidReport("bad_step_time", "step_time_seconds must be finite and >= 0")
    packed = m.HasField("packed")
    if packed and len(m.layers):
        raise InvalidReport("bad_shape", "a report carries its layers as LayerStats or as packed, not both")
    number = len(m.packed.layer) if packed else len(m.layers)
    if number > MAX_LAYERS:
        raise InvalidReport("too_many_layers", f"{number} layers, at most {MAX_LAYERS}")
    known = known_channels or {}
    layers = _from_packed(m.packed, known) if packed else _from_layer_messages(m.layers, known)
    layout = Layout(tuple(layers.names), tuple(layers.channels))
    _check_values(layers.values, layout)
    if not layers.sent_running.all():
        layers.values[2:, np.repeat(~layers.sent_running, layers.channels)] = np.nan
    mean, var, running_mean, running_var = torch.from_numpy(layers.values).unbind()
    return Report(m.run_id, m.worker_id, int(m.step), m.device_kind, int(m.batch_size),
                  float(m.step_time_seconds), layout, torch.tensor(layers.counts, dtype=torch.float64),
                  mean, var, running_mean, running_var)  # fmt: skip


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
        estimates = Estimates()
        for i, name in enumerate(self.layout.names):
            part = self.layout.slice(name)
            if float(cumulative.count[part.start]) > 0:
                estimates.cumulative[name] = Moments(cumulative.count[part.start], cumulative.mean[part],
                                                     cumulative.m2[part])  # fmt: skip
            if bool(started[i]):
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

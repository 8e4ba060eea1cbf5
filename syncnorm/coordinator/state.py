"""What the coordinator knows about each run, and the checks a report must pass.

A report is validated completely before it touches any state: a rejected report
changes nothing.  Global statistics of a layer are the exact merge of the
latest report of every live worker (count-weighted); the cumulative estimate
merges every accepted report; the EMA follows the merged latest reports, one
update per new step.

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
from syncnorm.moments import Moments, merge_pair

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
        return per_layer[..., self.layer_of_channel]

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


def _check_values(values: np.ndarray, layout: Layout, what: str) -> None:
    """Refuse non-finite, huge, or (for variances) negative values, naming the layer."""

    def layer(bad: np.ndarray) -> str:
        return layout.names[int(layout.layer_of_channel[int(np.argmax(bad))])]

    bad = ~np.isfinite(values)
    if bad.any():
        raise InvalidReport("not_finite", f"layer {layer(bad)!r}: {what} has NaN or infinite values")
    bad = np.abs(values) > MAX_MAGNITUDE
    if bad.any():
        raise InvalidReport("too_large", f"layer {layer(bad)!r}: {what} has values beyond {MAX_MAGNITUDE:g}")
    if what.endswith("var"):
        bad = values < 0
        if bad.any():
            raise InvalidReport("negative", f"layer {layer(bad)!r}: {what} must be >= 0")


_BLOCKS = ("mean", "var", "running_mean", "running_var")


@dataclass
class _Layers:
    """A report's layers before the value checks: per layer name, channels, count and
    whether it sent running buffers; per block the flat values (zeros where none)."""

    names: list[str] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)
    sent_running: list[bool] = field(default_factory=list)
    blocks: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name: str, channels: int, count: float, known: Mapping[str, int]) -> None:
        """Check one layer's name, channel count and count, and append them."""
        if not name or len(name) > MAX_ID_LENGTH * 2 or name in self.names:
            raise InvalidReport("bad_layer_name", f"layer names must be unique and non-empty: {name!r}")
        if not 0 < channels <= MAX_CHANNELS:
            raise InvalidReport(
                "bad_shape", f"layer {name!r}: needs 1..{MAX_CHANNELS} channels, got {channels}"
            )
        expected = known.get(name)
        if expected is not None and expected != channels:
            raise InvalidReport("shape_changed", f"layer {name!r} had {expected} channels, now {channels}")
        if not math.isfinite(count) or not 0 <= count <= MAX_MAGNITUDE:
            raise InvalidReport("negative", f"layer {name!r}: count must be finite and >= 0")
        self.names.append(name)
        self.channels.append(channels)
        self.counts.append(count)


def _from_layer_messages(layers: Sequence[Any], known: Mapping[str, int]) -> _Layers:
    out = _Layers()
    # numpy reads protobuf's repeated doubles ~30x faster than a Python list does
    vectors: dict[str, list[np.ndarray]] = {k: [] for k in _BLOCKS}
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
        out.add(layer.layer, c, layer.count, known)
        out.sent_running.append(bool(has_running))
        for block in _BLOCKS:
            values = getattr(layer, block)
            vectors[block].append(np.array(values, dtype=np.float64) if len(values) else np.zeros(c))
    out.blocks = {k: np.concatenate(v) if v else np.zeros(0) for k, v in vectors.items()}
    return out


def _from_packed(packed: Any, known: Mapping[str, int]) -> _Layers:
    names, channels, counts = packed.layer, packed.channels, packed.count
    if not len(names) == len(channels) == len(counts):
        raise InvalidReport(
            "bad_shape",
            f"packed: {len(names)} layer names, {len(channels)} channel counts, {len(counts)} counts",
        )
    out = _Layers()
    for name, c, count in zip(names, channels, counts, strict=True):
        out.add(name, c, count, known)
    size = 8 * sum(out.channels)
    has_running = len(packed.running_mean) > 0
    for block in _BLOCKS:
        raw = getattr(packed, block)
        wanted = size if has_running or not block.startswith("running") else 0
        if len(raw) != wanted:
            raise InvalidReport(
                "bad_shape", f"packed {block}: {len(raw)} bytes, expected {wanted} (8 per channel)"
            )
        out.blocks[block] = (
            np.frombuffer(raw, dtype="<f8").astype(np.float64) if wanted else np.zeros(size // 8)
        )
    out.sent_running = [has_running] * len(out.names)
    return out


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
    for block, values in layers.blocks.items():
        _check_values(values, layout, block)
    without_running = np.repeat(~np.array(layers.sent_running, dtype=bool), layers.channels)
    for block in ("running_mean", "running_var"):
        layers.blocks[block][without_running] = np.nan
    tensors = {k: torch.from_numpy(v) for k, v in layers.blocks.items()}
    return Report(m.run_id, m.worker_id, int(m.step), m.device_kind, int(m.batch_size),
                  float(m.step_time_seconds), layout, torch.tensor(layers.counts, dtype=torch.float64),
                  **tensors)  # fmt: skip


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

    def channels(self) -> Mapping[str, int]:
        return self.layout.channel_counts

    def apply(self, report: Report, now: float | None = None) -> None:
        """Take a validated report (see :func:`parse_report`)."""
        now = time.time() if now is None else now
        self._grow(report.layout)
        record = WorkerRecord.place(report, now, self.layout)
        self.workers[report.worker_id] = record
        self.reports += 1
        count = self.layout.per_channel(record.count)
        batch = Moments(count, record.mean, record.var * count)
        self.cumulative_moments = merge_pair(self.cumulative_moments, batch)
        if report.step > self.latest_step:
            self.latest_step = report.step
            merged, reported = self._merge_live(now)
            with_values = reported & (self.layout.at_layer_starts(merged.count) > 0)  # (L,)
            update = self.layout.per_channel(with_values)
            first = self.layout.per_channel(~self.ema_started)
            for name, value in (("ema_mean", merged.mean), ("ema_var", merged.unbiased_var)):
                previous = getattr(self, name)
                moved = torch.where(first, value, analysis.ema_update(previous, value, self.momentum))
                setattr(self, name, torch.where(update, moved, previous))
            self.ema_started = self.ema_started | with_values

    def cumulative(self, layer: str) -> Moments | None:
        """Every accepted report of ``layer`` merged; None before any values arrived."""
        part = self.layout.slice(layer)
        count = self.cumulative_moments.count[part.start]
        if float(count) == 0:
            return None
        return Moments(count, self.cumulative_moments.mean[part], self.cumulative_moments.m2[part])

    def ema(self, layer: str) -> tuple[Tensor, Tensor] | None:
        """The EMA of ``layer``'s merged (mean, unbiased variance); None before it starts."""
        if not bool(self.ema_started[self.layout.index[layer]]):
            return None
        part = self.layout.slice(layer)
        return self.ema_mean[part], self.ema_var[part]

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

    def _grow(self, layout: Layout) -> None:
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

"""What the coordinator knows about each run, and the checks a report must pass.

A report is validated completely before it touches any state: a rejected report
changes nothing.  Global statistics of a layer are the exact merge of the
latest report of every live worker (count-weighted); the cumulative estimate
merges every accepted report; the EMA follows the merged latest reports, one
update per new step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

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
class LayerReport:
    count: float
    mean: Tensor
    var: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None


@dataclass(frozen=True)
class Report:
    """A validated worker report (the protobuf message, checked and converted)."""

    run_id: str
    worker_id: str
    step: int
    device_kind: str
    batch_size: int
    step_time_seconds: float
    layers: dict[str, LayerReport]


@dataclass
class WorkerRecord:
    report: Report
    last_seen: float


@dataclass
class LayerGlobal:
    channels: int
    cumulative: Moments | None = None
    ema_mean: Tensor | None = None
    ema_var: Tensor | None = None


def _vector(values: object, what: str) -> Tensor:
    # numpy reads protobuf's repeated doubles ~30x faster than a Python list does
    array = np.array(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise InvalidReport("not_finite", f"{what} has NaN or infinite values")
    if array.size and np.abs(array).max() > MAX_MAGNITUDE:
        raise InvalidReport("too_large", f"{what} has values beyond {MAX_MAGNITUDE:g}")
    return torch.from_numpy(array)


def parse_report(message: object, known_channels: dict[str, int] | None = None) -> Report:
    """Check a ``ReportRequest`` and convert it; raises :class:`InvalidReport`.

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
    if len(m.layers) > MAX_LAYERS:
        raise InvalidReport("too_many_layers", f"{len(m.layers)} layers, at most {MAX_LAYERS}")
    layers: dict[str, LayerReport] = {}
    for layer in m.layers:
        if not layer.layer or len(layer.layer) > MAX_ID_LENGTH * 2 or layer.layer in layers:
            raise InvalidReport(
                "bad_layer_name", f"layer names must be unique and non-empty: {layer.layer!r}"
            )
        channels = len(layer.mean)
        if not 0 < channels <= MAX_CHANNELS or len(layer.var) != channels:
            raise InvalidReport(
                "bad_shape", f"layer {layer.layer!r}: mean and var need 1..{MAX_CHANNELS} values each"
            )
        for name in ("running_mean", "running_var"):
            if len(getattr(layer, name)) not in (0, channels):
                raise InvalidReport(
                    "bad_shape", f"layer {layer.layer!r}: {name} must be empty or {channels} values"
                )
        expected = (known_channels or {}).get(layer.layer)
        if expected is not None and expected != channels:
            raise InvalidReport(
                "shape_changed", f"layer {layer.layer!r} had {expected} channels, now {channels}"
            )
        if not math.isfinite(layer.count) or not 0 <= layer.count <= MAX_MAGNITUDE:
            raise InvalidReport("negative", f"layer {layer.layer!r}: count must be finite and >= 0")
        var = _vector(layer.var, f"layer {layer.layer!r} var")
        if bool((var < 0).any()):
            raise InvalidReport("negative", f"layer {layer.layer!r}: var must be >= 0")
        running_var = (
            _vector(layer.running_var, f"layer {layer.layer!r} running_var") if layer.running_var else None
        )
        if running_var is not None and bool((running_var < 0).any()):
            raise InvalidReport("negative", f"layer {layer.layer!r}: running_var must be >= 0")
        layers[layer.layer] = LayerReport(
            count=float(layer.count),
            mean=_vector(layer.mean, f"layer {layer.layer!r} mean"),
            var=var,
            running_mean=_vector(layer.running_mean, f"layer {layer.layer!r} running_mean")
            if layer.running_mean
            else None,
            running_var=running_var,
        )
    return Report(m.run_id, m.worker_id, int(m.step), m.device_kind, int(m.batch_size),
                  float(m.step_time_seconds), layers)  # fmt: skip


@dataclass
class RunState:
    """One run: its workers' latest reports and its layers' global statistics.

    Args:
        run_id: the run.
        momentum: EMA momentum of the global statistics.
        stale_after_s: a worker without a report for this long is stale (not live).
    """

    run_id: str
    momentum: float = 0.1
    stale_after_s: float = 60.0
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    layers: dict[str, LayerGlobal] = field(default_factory=dict)
    reports: int = 0
    latest_step: int = -1

    def channels(self) -> dict[str, int]:
        return {name: layer.channels for name, layer in self.layers.items()}

    def apply(self, report: Report, now: float | None = None) -> None:
        """Take a validated report (see :func:`parse_report`)."""
        now = time.time() if now is None else now
        self.workers[report.worker_id] = WorkerRecord(report, now)
        self.reports += 1
        for name, layer in report.layers.items():
            state = self.layers.setdefault(name, LayerGlobal(channels=layer.mean.numel()))
            if layer.count > 0:
                batch = Moments(
                    torch.tensor(layer.count, dtype=torch.float64), layer.mean, layer.var * layer.count
                )
                state.cumulative = batch if state.cumulative is None else merge_pair(state.cumulative, batch)
        if report.step > self.latest_step:
            self.latest_step = report.step
            for name, state in self.layers.items():
                merged = self.global_stats(name, now)
                if merged is not None and float(merged.count) > 0:
                    state.ema_mean = analysis.ema_update(state.ema_mean, merged.mean, self.momentum)
                    state.ema_var = analysis.ema_update(state.ema_var, merged.unbiased_var, self.momentum)

    def live(self, now: float | None = None) -> dict[str, WorkerRecord]:
        now = time.time() if now is None else now
        return {w: r for w, r in self.workers.items() if now - r.last_seen <= self.stale_after_s}

    def global_stats(self, layer: str, now: float | None = None) -> Moments | None:
        """The merge of the latest report of every live worker for ``layer``."""
        parts = [r.report.layers[layer] for r in self.live(now).values() if layer in r.report.layers]
        if not parts:
            return None
        return analysis.merge_reports(
            [p.count for p in parts], [p.mean for p in parts], [p.var for p in parts]
        )

    def drift(self, worker_id: str, now: float | None = None) -> tuple[float, float]:
        """(max over layers of the drift, max over layers of |log variance ratio|) of a worker."""
        record = self.workers[worker_id]
        drift, ratio = 0.0, 0.0
        for name, layer in record.report.layers.items():
            merged = self.global_stats(name, now)
            if merged is None or layer.count == 0:
                continue
            drift = max(drift, analysis.stats_drift(layer.mean, merged.mean, merged.biased_var))
            ratio = max(ratio, abs(analysis.log_var_ratio(layer.var, merged.biased_var)))
        return drift, ratio

    def layer_drift(self, now: float | None = None) -> dict[str, float]:
        """Per layer, the largest drift over live workers."""
        out: dict[str, float] = {}
        live = self.live(now)
        for name in self.layers:
            merged = self.global_stats(name, now)
            if merged is None:
                continue
            out[name] = max(
                (analysis.stats_drift(r.report.layers[name].mean, merged.mean, merged.biased_var)
                 for r in live.values() if name in r.report.layers and r.report.layers[name].count > 0),
                default=0.0,
            )  # fmt: skip
        return out

    def running_stats_divergence(self, now: float | None = None) -> float:
        live = self.live(now)
        worst = 0.0
        for name in self.layers:
            parts = [r.report.layers[name] for r in live.values() if name in r.report.layers]
            buffers = [
                (p.running_mean, p.running_var)
                for p in parts
                if p.running_mean is not None and p.running_var is not None
            ]
            if len(buffers) > 1:
                worst = max(
                    worst, analysis.running_stats_divergence([b[0] for b in buffers], [b[1] for b in buffers])
                )
        return worst

    def batch_sizes(self, now: float | None = None) -> dict[str, int]:
        return {w: r.report.batch_size for w, r in self.live(now).items()}

    def recommendations(self, global_batch: int | None = None, now: float | None = None) -> dict[str, int]:
        live = self.live(now)
        return analysis.recommend_batch_sizes(
            {w: r.report.batch_size for w, r in live.items()},
            {w: r.report.step_time_seconds for w, r in live.items()},
            global_batch,
        )

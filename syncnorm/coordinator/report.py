"""A worker's report: the checks it must pass, and its conversion to tensors.

A report is validated completely before it touches any state: a rejected report
changes nothing.  Its layers come as ``LayerStats`` messages or as one
``PackedLayerStats``; both give the same :class:`Report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from syncnorm.coordinator.layout import Layout

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

"""Report validation and per-run state, against statistics computed directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from syncnorm.coordinator.report import REJECTION_REASONS, InvalidReport, parse_report
from syncnorm.coordinator.state import OPEN_STEPS, RunState
from syncnorm.coordinator.v1.coordinator_pb2 import LayerStats, PackedLayerStats, ReportRequest


def _batch(seed: int, n: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def _request(worker: str, step: int, x: torch.Tensor, **overrides: object) -> ReportRequest:
    layer = LayerStats(
        layer="bn1", count=x.shape[0], mean=x.mean(0).tolist(), var=x.var(0, correction=0).tolist(),
        running_mean=[0.0] * x.shape[1], running_var=[1.0] * x.shape[1],
    )  # fmt: skip
    fields = {"run_id": "run", "worker_id": worker, "step": step, "device_kind": "cpu",
              "batch_size": x.shape[0], "step_time_seconds": 0.1, "layers": [layer]}  # fmt: skip
    fields.update(overrides)
    return ReportRequest(**fields)


def test_global_statistics_are_the_merge_of_the_latest_reports() -> None:
    run = RunState("run")
    a, b = _batch(0, 8), _batch(1, 24)
    run.apply(parse_report(_request("w0", 10, _batch(9, 5))), now=0.0)  # superseded by the next one
    run.apply(parse_report(_request("w0", 20, a)), now=1.0)
    run.apply(parse_report(_request("w1", 20, b)), now=1.0)
    merged = run.global_stats("bn1", now=2.0)
    both = torch.cat([a, b])
    torch.testing.assert_close(merged.mean, both.mean(0))
    torch.testing.assert_close(merged.biased_var, both.var(0, correction=0))
    every = torch.cat([_batch(9, 5), a, b])  # the cumulative estimate keeps every report
    torch.testing.assert_close(run.cumulative("bn1").mean, every.mean(0))
    torch.testing.assert_close(run.cumulative("bn1").unbiased_var, every.var(0))
    assert run.batch_sizes(now=2.0) == {"w0": 8, "w1": 24}
    assert run.reports == 3 and run.latest_step == 20


def test_a_shifted_worker_shows_its_drift_and_staleness_ages_workers_out() -> None:
    run = RunState("run", stale_after_s=30)
    for w in range(3):
        run.apply(parse_report(_request(f"w{w}", 1, _batch(w, 4000, shift=2.0 if w == 2 else 0.0))), now=0.0)
    drift, _ = run.drift("w2", now=1.0)
    normal, _ = run.drift("w0", now=1.0)
    # mixture of thirds: global mean 2/3, global variance 1 + 8/9
    assert drift == pytest.approx((4 / 3) / math.sqrt(1 + 8 / 9), rel=0.05)
    assert normal == pytest.approx((2 / 3) / math.sqrt(1 + 8 / 9), rel=0.1)
    assert max(run.layer_drift(now=1.0).values()) == pytest.approx(drift)
    assert set(run.live(now=31.0)) == set()


def test_ema_is_batchnorm_running_stats_over_each_steps_global_batch() -> None:
    """Two workers with uneven batches report 8 steps, some reports arriving after the
    other worker's later steps; the EMA is what one torch.nn.BatchNorm1d keeps when fed
    each step's concatenated global batch (its buffers started at step 0's statistics)."""
    momentum = 0.3
    run = RunState("run", momentum=momentum)
    sizes = (5, 11)
    batches = {(w, s): _batch(10 * s + w, sizes[w], shift=0.5 * s) for w in range(2) for s in range(8)}
    order = [(0, 0), (1, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (0, 4), (1, 3), (1, 4),
             (0, 5), (0, 6), (0, 7), (1, 5), (1, 6), (1, 7)]  # fmt: skip
    assert len(set(order)) == len(batches)
    for w, s in order:
        run.apply(parse_report(_request(f"w{w}", s, batches[w, s])), now=0.0)
    bn = torch.nn.BatchNorm1d(4, momentum=momentum, dtype=torch.float64)
    first = torch.cat([batches[0, 0], batches[1, 0]])
    bn.running_mean.copy_(first.mean(0))
    bn.running_var.copy_(first.var(0))
    for s in range(1, 8):
        bn(torch.cat([batches[0, s], batches[1, s]]))
    mean, var = run.ema("bn1")
    torch.testing.assert_close(mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert run.folded_through == 7 - OPEN_STEPS  # the newest steps wait, and are read all the same


def test_a_report_older_than_the_open_steps_misses_the_ema_only() -> None:
    run = RunState("run", momentum=0.5)
    for s in range(OPEN_STEPS + 2):
        run.apply(parse_report(_request("w0", s, _batch(s, 6, shift=s))), now=0.0)
    ema = run.ema("bn1")
    late = _batch(99, 6, shift=-50.0)
    run.apply(parse_report(_request("w1", 0, late)), now=0.0)  # step 0 is in the EMA already
    torch.testing.assert_close(run.ema("bn1"), ema, rtol=0, atol=0)
    every = torch.cat([_batch(s, 6, shift=s) for s in range(OPEN_STEPS + 2)] + [late])
    torch.testing.assert_close(run.cumulative("bn1").mean, every.mean(0))
    assert run.reports == OPEN_STEPS + 3


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"run_id": ""}, "bad_id"),
        ({"batch_size": -1}, "negative"),
        ({"step_time_seconds": math.nan}, "bad_step_time"),
        ({"layers": [LayerStats(layer="bn1", count=4, mean=[0.0, math.inf], var=[1.0, 1.0])]}, "not_finite"),
        ({"layers": [LayerStats(layer="bn1", count=4, mean=[0.0], var=[1.0, 1.0])]}, "bad_shape"),
        ({"layers": [LayerStats(layer="bn1", count=4, mean=[0.0], var=[-1.0])]}, "negative"),
        ({"layers": [LayerStats(layer="bn1", count=-4, mean=[0.0], var=[1.0])]}, "negative"),
        ({"layers": [LayerStats(layer="", count=4, mean=[0.0], var=[1.0])]}, "bad_layer_name"),
        ({"layers": [LayerStats(layer="bn1", count=4, mean=[1e70], var=[1.0])]}, "too_large"),
        ({"layers": [LayerStats(layer=f"l{i}", count=1, mean=[0.0], var=[0.0]) for i in range(1025)]},
         "too_many_layers"),
    ],
)  # fmt: skip
def test_bad_reports_are_rejected_with_a_reason(change: dict, reason: str) -> None:
    with pytest.raises(InvalidReport) as info:
        parse_report(_request("w0", 1, _batch(0, 4), **change))
    assert info.value.reason == reason


def test_every_reason_raised_is_listed_for_the_metrics() -> None:
    import ast
    import inspect

    import syncnorm.coordinator.report as report

    raised = {
        call.args[0].value
        for call in ast.walk(ast.parse(inspect.getsource(report)))
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "InvalidReport"
    }
    assert raised == set(REJECTION_REASONS)


def test_a_layer_may_not_change_its_channel_count() -> None:
    run = RunState("run")
    run.apply(parse_report(_request("w0", 1, _batch(0, 4))), now=0.0)
    narrower = _request("w1", 1, _batch(1, 4)[:, :2])
    with pytest.raises(InvalidReport, match="had 4 channels, now 2") as info:
        parse_report(narrower, run.channels())
    assert info.value.reason == "shape_changed"
    assert run.reports == 1 and set(run.workers) == {"w0"}


def test_mismatch_recommendations_and_divergence() -> None:
    run = RunState("run")
    run.apply(parse_report(_request("w0", 1, _batch(0, 8), step_time_seconds=0.1)), now=0.0)
    slow = _request("w1", 1, _batch(1, 24), step_time_seconds=0.9)
    slow.layers[0].running_mean[:] = [2.0] * 4
    run.apply(parse_report(slow), now=0.0)
    sizes = run.batch_sizes(now=0.0)
    assert max(sizes.values()) / min(sizes.values()) == 3.0
    # w0: 80 samples/s, w1: ~26.7 samples/s -> w0 gets 3/4 of the 32
    assert run.recommendations(now=0.0) == {"w0": 24, "w1": 8}
    assert run.running_stats_divergence(now=0.0) == pytest.approx(1.0, rel=1e-4)


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)


@given(
    run_id=st.text(max_size=140),
    step=st.integers(-5, 2**40),
    batch=st.integers(-5, 2**40),
    step_time=finite_or_not,
    layers=st.lists(
        st.builds(
            LayerStats,
            layer=st.text(max_size=20),
            count=finite_or_not,
            mean=st.lists(finite_or_not, max_size=6),
            var=st.lists(finite_or_not, max_size=6),
            running_mean=st.lists(finite_or_not, max_size=6),
            running_var=st.lists(finite_or_not, max_size=6),
        ),
        max_size=4,
    ),
)
@settings(max_examples=300, deadline=None)
def test_fuzzed_reports_are_either_rejected_cleanly_or_applied(
    run_id, step, batch, step_time, layers
) -> None:
    run = RunState("run")
    message = ReportRequest(run_id=run_id, worker_id="w", step=step, batch_size=batch,
                            step_time_seconds=step_time, layers=layers)  # fmt: skip
    try:
        report = parse_report(message, run.channels())
    except InvalidReport as error:
        assert error.reason and run.reports == 0
        return
    run.apply(report, now=0.0)
    for name in report.layers:
        stats = run.global_stats(name, now=0.0)
        assert stats is not None and bool(torch.isfinite(stats.mean).all())
        assert bool(torch.isfinite(stats.m2).all())


def _layer(name: str, x: torch.Tensor, running: bool = True) -> LayerStats:
    c = x.shape[1]
    return LayerStats(
        layer=name, count=x.shape[0], mean=x.mean(0).tolist(), var=x.var(0, correction=0).tolist(),
        running_mean=x.mean(0).tolist() if running else [], running_var=[1.0] * c if running else [],
    )  # fmt: skip


def test_layers_of_different_widths_reported_in_any_order_and_subset() -> None:
    """Workers send different subsets of a model's layers, in different orders, some
    without running buffers, and a layer appears only later: every statistic must
    still be the per-layer one, computed here directly from the data."""
    widths = {"a": 3, "b": 5, "c": 2}
    data = {
        (w, name): torch.randn(n, widths[name], generator=torch.Generator().manual_seed(10 * w + i),
                               dtype=torch.float64) + (2.0 if w == 2 else 0.0)
        for w, n in ((0, 7), (1, 12), (2, 30)) for i, name in enumerate(widths)
    }  # fmt: skip
    sent = {0: ["a", "b"], 1: ["c", "a", "b"], 2: ["c", "a"]}  # "c" is new with worker 1
    run = RunState("run")
    for w, names in sent.items():
        layers = [_layer(name, data[w, name], running=w != 1 or name != "a") for name in names]
        message = ReportRequest(run_id="run", worker_id=f"w{w}", step=1, batch_size=1, layers=layers)
        run.apply(parse_report(message, run.channels()), now=0.0)
    for name in widths:
        everything = torch.cat([data[w, name] for w, names in sent.items() if name in names])
        merged = run.global_stats(name, now=0.0)
        torch.testing.assert_close(merged.mean, everything.mean(0))
        torch.testing.assert_close(merged.biased_var, everything.var(0, correction=0))
        assert float(merged.count) == everything.shape[0]
    for w, names in sent.items():
        shifts = []
        for name in names:
            everything = torch.cat([data[v, name] for v, ns in sent.items() if name in ns])
            shift = (data[w, name].mean(0) - everything.mean(0)).abs()
            shifts.append(float((shift / (everything.var(0, correction=0) + 1e-5).sqrt()).mean()))
        assert run.drift(f"w{w}", now=0.0)[0] == pytest.approx(max(shifts), rel=1e-9)
    # running means: layer "a" has buffers from w0 and w2 only, "b" from w0 and w1, "c" from w1 and w2
    expected = 0.0
    for name, holders in (("a", (0, 2)), ("b", (0, 1)), ("c", (1, 2))):
        means = torch.stack([data[w, name].mean(0) for w in holders])
        expected = max(expected, float(((means - means.mean(0)).abs() / (1 + 1e-5) ** 0.5).mean(1).max()))
    assert run.running_stats_divergence(now=0.0) == pytest.approx(expected, rel=1e-9)


def _packed(layers: list[LayerStats], running: bool = True, dtype: str = "<f8") -> PackedLayerStats:
    """The same layers as one PackedLayerStats, built here from the LayerStats values."""

    def block(field: str) -> bytes:
        return np.concatenate([np.array(getattr(layer, field), dtype=dtype) for layer in layers]).tobytes()

    packed = PackedLayerStats(
        layer=[layer.layer for layer in layers],
        channels=[len(layer.mean) for layer in layers],
        count=[layer.count for layer in layers],
        mean=block("mean"),
        var=block("var"),
        value_type=PackedLayerStats.ValueType.Value(f"VALUE_TYPE_FLOAT{8 * int(dtype[-1])}"),
    )
    if running:
        packed.running_mean, packed.running_var = block("running_mean"), block("running_var")
    return packed


@pytest.mark.parametrize("running", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_packed_layers_give_the_report_the_layer_messages_give(running: bool, dtype: torch.dtype) -> None:
    """Values held in ``dtype`` (float32: as an fp32 model holds them) read back
    exactly from float64 LayerStats and from packed blocks of ``dtype``."""
    widths = (3, 5, 2)
    data = [torch.randn(6 + i, c, generator=torch.Generator().manual_seed(i), dtype=dtype).double()
            for i, c in enumerate(widths)]  # fmt: skip
    layers = [_layer(f"l{i}", x, running=running) for i, x in enumerate(data)]
    if dtype == torch.float32:  # the statistics themselves rounded to float32, as a worker holds them
        for layer in layers:
            for block in ("mean", "var", "running_mean", "running_var"):
                getattr(layer, block)[:] = np.array(getattr(layer, block), dtype=np.float32).tolist()
    header = {"run_id": "run", "worker_id": "w0", "step": 3, "batch_size": 6}
    one_by_one = parse_report(ReportRequest(**header, layers=layers))
    packed_layers = _packed(layers, running, "<f8" if dtype == torch.float64 else "<f4")
    packed = parse_report(ReportRequest(**header, packed=packed_layers))
    assert packed.layout == one_by_one.layout and packed.layout.channels == widths
    for block in ("count", "mean", "var", "running_mean", "running_var"):
        assert torch.equal(getattr(packed, block).nan_to_num(), getattr(one_by_one, block).nan_to_num())
    assert bool(packed.running_mean.isnan().all()) != running


def _bad_packed(**change: object) -> PackedLayerStats:
    layers = [_layer("a", _batch(0, 4)), _layer("b", _batch(1, 4)[:, :2])]
    packed = _packed(layers)
    for name, value in change.items():
        if isinstance(value, list):
            getattr(packed, name)[:] = value
        else:
            setattr(packed, name, value)
    return packed


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"channels": [4]}, "bad_shape"),
        ({"channels": [4, 3]}, "bad_shape"),
        ({"channels": [4, 0]}, "bad_shape"),
        ({"layer": ["a", "a"]}, "bad_layer_name"),
        ({"count": [4.0, -1.0]}, "negative"),
        ({"mean": b"\0" * 7}, "bad_shape"),
        ({"running_var": b""}, "bad_shape"),
        ({"mean": np.array([0.0] * 5 + [np.nan], dtype="<f8").tobytes()}, "not_finite"),
        ({"var": np.array([1.0] * 5 + [-1.0], dtype="<f8").tobytes()}, "negative"),
        ({"running_mean": np.array([1e70] * 6, dtype="<f8").tobytes()}, "too_large"),
        ({"value_type": PackedLayerStats.VALUE_TYPE_FLOAT32}, "bad_shape"),  # 8 bytes a value where 4 are due
        ({"value_type": 7}, "bad_shape"),
    ],
)  # fmt: skip
def test_bad_packed_reports_are_rejected_with_a_reason(change: dict, reason: str) -> None:
    with pytest.raises(InvalidReport) as info:
        parse_report(ReportRequest(run_id="run", worker_id="w0", packed=_bad_packed(**change)))
    assert info.value.reason == reason


def test_a_report_may_not_carry_both_encodings() -> None:
    message = ReportRequest(run_id="run", worker_id="w0", layers=[_layer("a", _batch(0, 4))],
                            packed=_bad_packed())  # fmt: skip
    with pytest.raises(InvalidReport, match="not both"):
        parse_report(message)


@given(
    names=st.lists(st.text(max_size=8), max_size=4),
    channels=st.lists(st.integers(0, 5), max_size=4),
    counts=st.lists(finite_or_not, max_size=4),
    blocks=st.lists(st.binary(max_size=100), min_size=4, max_size=4),
    value_type=st.integers(0, 2),
)
@settings(max_examples=300, deadline=None)
def test_fuzzed_packed_reports_are_either_rejected_cleanly_or_applied(
    names, channels, counts, blocks, value_type
) -> None:
    run = RunState("run")
    packed = PackedLayerStats(layer=names, channels=channels, count=counts, mean=blocks[0], var=blocks[1],
                              running_mean=blocks[2], running_var=blocks[3])  # fmt: skip
    packed.value_type = value_type
    try:
        report = parse_report(ReportRequest(run_id="run", worker_id="w", packed=packed), run.channels())
    except InvalidReport as error:
        assert error.reason in REJECTION_REASONS and run.reports == 0
        return
    run.apply(report, now=0.0)
    for name in report.layers:
        stats = run.global_stats(name, now=0.0)
        assert stats is not None and bool(torch.isfinite(stats.mean).all())

"""The benchmarks run and report what they promise (speed itself is not asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_reports_every_case_and_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.overhead import print_tables

    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--world-sizes", "2", "--channels", "64",
         "--rounds", "2", "--repeats", "1", "--json"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert [(r["world_size"], r["channels"]) for r in rows] == [(2, 64)]
    r = rows[0]
    assert r["primitive"] == "shared_memory" and r["floor_primitive"] == "all_gather"
    for case in ("local_bn", "syncnorm", "syncnorm_gloo", "torch_design", "detectron2_design", "mmcv_design",
                 "all_gather", "all_reduce", "shared_memory"):  # fmt: skip
        assert r[f"{case}_ms"] > 0, case
    assert r["floor_ms"] == pytest.approx(2 * r["all_gather_ms"], abs=1e-3)
    assert abs(r["overhead_over_floor"] - (r["syncnorm_ms"] - r["local_bn_ms"]) / r["floor_ms"]) < 1e-2
    for other in ("syncnorm_gloo", "torch_design", "detectron2_design", "mmcv_design"):
        ratio = r[f"{other}_over_floor"]
        assert abs(ratio - (r[f"{other}_ms"] - r["local_bn_ms"]) / r["floor_ms"]) < 1e-2, other

    print_tables(rows, 2, 1, "cpu")
    table = capsys.readouterr().out
    number = r" (-?[\d.]+) \|"
    assert re.search(r"^\| 2 \| 64 \|" + number * 9 + "$", table, re.M), table
    ratios = re.search(r"^\| 2 \| 64 \| 2 x all_gather \|" + number * 6 + "$", table, re.M)
    assert ratios and float(ratios.group(1)) > 0, table


def test_whole_model_benchmark_reports_step_ratio_and_peak_memory() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.whole_model", "--world-sizes", "2", "--width", "8",
         "--rounds", "3", "--repeats", "1"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "20 BN layers (C = 8, 8, 8, 8, 8, 16, " in out, out
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| 2 |")
    ]
    step = next(r for r in rows if len(r) == 9)
    local, sync, sync_gloo, gathers, reduces = (float(v) for v in step[1:6])
    floor, ratio, ratio_gloo = (
        float(step[6].removesuffix(" (2 x all_gather)")),
        float(step[7]),
        float(step[8]),
    )
    assert min(local, sync, sync_gloo, gathers, reduces) > 0
    assert floor == pytest.approx(2 * gathers, abs=0.02)
    assert ratio == pytest.approx((sync - local) / floor, abs=0.02)
    assert ratio_gloo == pytest.approx((sync_gloo - local) / floor, abs=0.02)
    memory = next(r for r in rows if len(r) == 6)
    local_mib, sync_mib, peak_ratio, gloo_mib, gloo_ratio = (float(v) for v in memory[1:])
    assert local_mib > 0 and sync_mib > 0 and peak_ratio == pytest.approx(sync_mib / local_mib, abs=0.01)
    assert gloo_ratio == pytest.approx(gloo_mib / local_mib, abs=0.01)


def test_whole_model_has_twenty_batch_norm_layers() -> None:
    from benchmarks.whole_model import ResNet18, bn_channels

    model = ResNet18(width=4)
    assert bn_channels(model) == [4] * 5 + [8] * 5 + [16] * 5 + [32] * 5
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_small_batch_benchmark_reports_table_json_and_plot(tmp_path: Path) -> None:
    plot, raw = tmp_path / "plot.png", tmp_path / "raw.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.small_batch", "--workers", "2", "--per-worker", "8",
         "--epochs", "1", "--seeds", "0", "--plot", str(plot), "--json", str(raw)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(raw.read_text())
    assert [(r["norm"], r["workers"], r["batch_per_worker"]) for r in rows] == [
        ("local", 2, 8), ("sync", 2, 8), ("one process", 1, 4),
    ]  # fmt: skip
    assert all(0.0 <= a <= 1.0 for r in rows for a in r["accuracies"])
    assert "| syncnorm SyncBatchNorm | 2 x 8 | 16 |" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transport_benchmark_reports_gloo_and_actor_side_by_side() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.transports", "--world-sizes", "2", "--channels", "8",
         "--rounds", "5"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 2 | 8 |"))
    values = [float(v) for v in row.strip("|").split("|")[2:]]
    assert len(values) == 4 and all(v > 0 for v in values)


def test_coordinator_load_benchmark_reports_rate_and_latency() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.coordinator_load", "--workers", "1", "--seconds", "1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "53 layers, 26560 channels" in result.stdout
    for encoding in ("layer messages", "packed float64", "packed float32"):
        for server in ("bare gRPC", "coordinator", "coordinator --state-dir"):
            row = rf"{server}, {encoding} +\d+ reports/s, p50 +[\d.]+ ms, p99 +[\d.]+ ms"
            assert re.search(row, result.stdout), result.stdout
        assert re.search(rf"bare gRPC throughput, {encoding}: [\d.]+", result.stdout), result.stdout


_PER_RANK = 4


def _global_batch(world_size: int) -> tuple[torch.Tensor, ...]:
    """The same global batch on every rank and in the test: input off zero mean, upstream
    gradient, weight and bias."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(world_size * _PER_RANK, 8, 5, 5, generator=gen) * 2.0 + 0.5
    dy = torch.randn(x.shape, generator=gen)
    return x, dy, torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)


def _design_step(rank: int, world_size: int, design: str) -> dict[str, torch.Tensor]:
    from benchmarks.baselines import BaselineBatchNorm2d

    x, dy, weight, bias = _global_batch(world_size)
    layer = BaselineBatchNorm2d(x.shape[1], design=design)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    mine = x[rank * _PER_RANK : (rank + 1) * _PER_RANK].clone().requires_grad_()
    y = layer(mine)
    y.backward(dy[rank * _PER_RANK : (rank + 1) * _PER_RANK])
    assert mine.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None
    return {
        "y": y.detach(), "dx": mine.grad, "dweight": layer.weight.grad, "dbias": layer.bias.grad,
        "running_mean": layer.running_mean, "running_var": layer.running_var,
    }  # fmt: skip


@pytest.mark.parametrize("design", ["torch", "detectron2", "mmcv"])
def test_baseline_design_matches_batchnorm_on_concatenated_batch(ranks, design: str) -> None:
    """The benchmark's re-implementations compute batch norm over the global batch."""
    world = 2
    traces = ranks(world).run(_design_step, design)
    x, dy, weight, bias = _global_batch(world)
    reference = torch.nn.BatchNorm2d(x.shape[1])
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    x.requires_grad_()
    y = reference(x)
    y.backward(dy)
    assert x.grad is not None and reference.weight.grad is not None and reference.bias.grad is not None
    close = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(torch.cat([t["y"] for t in traces]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([t["dx"] for t in traces]), x.grad, **close)
    for name, expected in (("dweight", reference.weight.grad), ("dbias", reference.bias.grad)):
        shares = [t[name] for t in traces]
        if design == "mmcv":  # every worker returns the group's average
            for share in shares:
                torch.testing.assert_close(share * world, expected, **close)
        else:  # every worker returns its own share; DDP sums them (up to its 1/W)
            torch.testing.assert_close(torch.stack(shares).sum(0), expected, **close)
    running_var = reference.running_var  # momentum 0.1 from 1, unbiased
    if design == "detectron2":  # keeps the biased variance
        n = x.numel() // x.shape[1]
        running_var = 0.9 + (reference.running_var - 0.9) * (n - 1) / n
    for t in traces:
        torch.testing.assert_close(t["running_mean"], reference.running_mean, **close)
        torch.testing.assert_close(t["running_var"], running_var, **close)

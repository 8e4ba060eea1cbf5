"""The benchmarks run and report what they promise (speed itself is not asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_reports_every_size_and_ratio() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--world-sizes", "2", "--channels", "8,16",
         "--rounds", "2", "--repeats", "1", "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["world_size"], r["channels"]) for r in rows] == [(2, 8), (2, 16)]
    for r in rows:
        assert r["primitive"] == "all_gather"
        assert r["floor_ms"] > 0 and r["syncnorm_ms"] > 0 and r["local_bn_ms"] > 0
        expected = (r["syncnorm_ms"] - r["local_bn_ms"]) / r["floor_ms"]
        assert abs(r["overhead_over_floor"] - expected) < 1e-2


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
    for server in ("bare gRPC", "coordinator"):
        assert re.search(server + r" +\d+ reports/s, p50 +[\d.]+ ms, p99 +[\d.]+ ms", result.stdout), (
            result.stdout
        )
    assert re.search(r"coordinator / bare gRPC throughput: [\d.]+", result.stdout), result.stdout

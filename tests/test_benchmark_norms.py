"""benchmarks/norms.py runs and reports what it promises (accuracy itself is not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_norms_benchmark_reports_table_json_and_plot(tmp_path: Path) -> None:
    plot, raw = tmp_path / "plot.png", tmp_path / "raw.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.norms", "--workers", "2", "--per-worker", "32",
         "--epochs", "1", "--seeds", "0", "--norms", "switchable,group", "--plot", str(plot),
         "--json", str(raw)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(raw.read_text())
    assert [(r["norm"], r["batch_per_worker"], r["lr"]) for r in rows] == [
        ("switchable", 32, 0.05),
        ("group", 32, 0.01),
    ]
    assert all(0.0 <= a <= 1.0 for r in rows for a in r["accuracies"])
    assert "| norm | 2 x 32 |" in result.stdout
    assert "| syncnorm SyncSwitchableNorm2d | " in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_norms_benchmark_rejects_unknown_norms() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.norms", "--norms", "sync,instance"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and "unknown norms ['instance']" in result.stderr

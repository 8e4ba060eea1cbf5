"""The command line and the README's promises about it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _syncnorm(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncnorm", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def test_demo_is_exact_and_local_bn_is_not() -> None:
    result = _syncnorm("demo", "--batch-sizes", "5,0,2", "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert "3 Gloo workers" in result.stdout
    for key in ("outputs", "input gradients", "running_mean", "running_var"):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(key))
        synced, local = (float(v) for v in re.findall(r"\d\.\d+e[+-]\d+", line))
        assert synced < 1e-5, line
        assert local > 1e-3, line


def test_demo_rejects_bad_batch_sizes_with_a_usage_error() -> None:
    result = _syncnorm("demo", "--batch-sizes", "4,x")
    assert result.returncode == 2
    assert "comma-separated integers" in result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command", 1)[1].split("```sh\n", 1)[1].split("\n", 1)[0]
    extracted = subprocess.run(
        ["bash", "scripts/readme-test-command.sh"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()
    assert extracted == block.strip() == "bash scripts/install.sh dev && python -m pytest"
    assert "scripts/readme-test-command.sh" in (ROOT / ".ci" / "run").read_text()

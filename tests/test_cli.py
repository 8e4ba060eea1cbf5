"""The command line, torchrun, and the README's promises about them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from syncnorm.launch import free_loopback_port
from syncnorm.train.model import digits_cnn
from tests.cases import printed_accuracy as _accuracy

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _syncnorm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, "-m", "syncnorm", *args, timeout=timeout)


def test_demo_syncbn_workers_end_where_one_process_ends() -> None:
    result = _syncnorm("demo", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    rows = {
        line[:28].strip(): line.split()
        for line in result.stdout.splitlines()
        if line[:4] in ("sync", "torc", "one ")
    }
    sync, local, single = (
        rows["syncnorm SyncBatchNorm"],
        rows["torch BatchNorm per worker"],
        rows["one process, global batch"],
    )
    assert sync[-3] == "2,4,6,20" and single[-3] == "32"
    assert sync[-2] == single[-2]  # same test accuracy
    gap = float(re.search(r"single process's: (\S+)$", result.stdout, re.MULTILINE).group(1))
    assert gap < 1e-9
    assert float(local[-2]) <= 1.0


def test_train_one_process_prints_accuracy_and_writes_a_torch_bn_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "digits.pt"
    result = _syncnorm("train", "--epochs", "2", "--no-progress", "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr
    assert _accuracy(result.stdout) > 0.8
    plain = digits_cnn()  # built with torch.nn.BatchNorm2d
    plain.load_state_dict(torch.load(checkpoint))


def test_torchrun_two_workers_uneven_batches_equal_one_process(tmp_path: Path) -> None:
    distributed, single = tmp_path / "two.pt", tmp_path / "one.pt"
    port = free_loopback_port()
    result = _run(
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "syncnorm", "train", "--batch-sizes", "8,24", "--epochs", "1", "--no-progress",
        "--device", "cpu", "--dtype", "float64", "--checkpoint", str(distributed),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "workers: 2, batch sizes: 8,24" in result.stdout
    reference = _syncnorm("train", "--batch-sizes", "32", "--epochs", "1", "--no-progress", "--norm", "local",
                          "--dtype", "float64", "--checkpoint", str(single))  # fmt: skip
    assert reference.returncode == 0, reference.stderr
    assert _accuracy(result.stdout) == _accuracy(reference.stdout)
    two, one = torch.load(distributed), torch.load(single)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-9, atol=1e-9, msg=key)


def test_train_rejects_a_batch_size_count_that_does_not_fit_the_workers() -> None:
    result = _syncnorm("train", "--batch-sizes", "8,24", "--no-progress")
    assert result.returncode == 2
    assert "gives 2 sizes for 1 worker(s)" in result.stderr


def test_train_rejects_an_input_shift_for_a_missing_rank_or_badly_written() -> None:
    result = _syncnorm("train", "--input-shift", "1:0.5", "--no-progress")
    assert result.returncode == 2
    assert "--input-shift names rank 1, not one of 1 worker(s)" in result.stderr
    result = _syncnorm("train", "--input-shift", "0.5", "--no-progress")
    assert result.returncode == 2 and "expected RANK:SHIFT" in result.stderr


def test_demo_rejects_bad_batch_sizes_with_a_usage_error() -> None:
    result = _syncnorm("demo", "--batch-sizes", "4,x")
    assert result.returncode == 2
    assert "comma-separated integers" in result.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = readme.split("<!-- test-command", 1)[1].split("```sh\n", 1)[1].split("\n", 1)[0]
    assert command == "bash scripts/install.sh dev,ray && python -m pytest"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == command  # CI's last step is exactly the user's command

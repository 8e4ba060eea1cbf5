"""Workers reporting to a real coordinator: metrics against the statistics of the data sent."""

from __future__ import annotations

import math
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import syncnorm
from syncnorm.coordinator.report import parse_report
from syncnorm.coordinator.reporter import LayerSnapshot, StatsReporter, build_report
from syncnorm.coordinator.server import start_coordinator
from syncnorm.coordinator.v1.coordinator_pb2 import PackedLayerStats
from syncnorm.moments import local_moments

SIZES = (8, 24)
SHIFT = 3.0


def _metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError((name, labels))


def _shifted_worker_job(rank: int, world_size: int, address: str) -> tuple[int, int, int]:
    layer = syncnorm.SyncBatchNorm(4)
    model = syncnorm.name_layers(torch.nn.Sequential(layer))
    reporter = StatsReporter(model, address, run_id="planted", worker_id=f"rank-{rank}", report_every=1)
    for step in range(3):
        x = torch.randn(SIZES[rank], 4, generator=torch.Generator().manual_seed(10 * step + rank))
        model(x + (SHIFT if rank == 0 else 0.0)).sum().backward()
        reporter.step(step, len(x), 0.01)
    reporter.close()
    return reporter.sent, reporter.dropped, reporter.failed


def test_two_workers_8_and_24_with_a_planted_shift(ranks) -> None:
    running = start_coordinator(host="127.0.0.1")
    try:
        results = ranks(2).run(_shifted_worker_job, f"127.0.0.1:{running.grpc_port}")
        assert all(r == (3, 0, 0) for r in results)
        assert _metric(running.metrics_port, "syncnorm_batch_size_mismatch_ratio", run="planted") == 3.0
        # the last step's batches, as the coordinator merged them
        last = [
            torch.randn(n, 4, generator=torch.Generator().manual_seed(20 + r)) for r, n in enumerate(SIZES)
        ]
        last[0] = last[0] + SHIFT
        everything = torch.cat(last).double()
        expected = float(((last[0].double().mean(0) - everything.mean(0)).abs()
                          / (everything.var(0, correction=0) + 1e-5).sqrt()).mean())  # fmt: skip
        drift = _metric(running.metrics_port, "syncnorm_worker_stats_drift", run="planted", worker="rank-0")
        assert drift == pytest.approx(expected, rel=1e-6)
        assert drift > 1.0
    finally:
        running.stop()


def test_training_goes_on_when_the_coordinator_is_down() -> None:
    model = syncnorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    reporter = StatsReporter(model, "127.0.0.1:1", run_id="r", worker_id="w", report_every=1,
                             queue_size=2, deadline_s=0.2)  # fmt: skip
    started = time.perf_counter()
    for step in range(50):
        model(torch.randn(4, 3))
        reporter.step(step, 4, 0.0)
    assert time.perf_counter() - started < 2.0  # the training thread never waited on the network
    reporter.close(timeout_s=5)
    assert reporter.sent == 0 and reporter.failed + reporter.dropped == 50 and reporter.failed >= 1
    assert model[0].moment_observers == []


def test_syncnorm_train_reports_to_the_coordinator(tmp_path) -> None:
    import subprocess
    import sys

    from syncnorm.launch import free_loopback_port

    running = start_coordinator(host="127.0.0.1")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
             "--master-addr", "127.0.0.1", "--master-port", str(free_loopback_port()),
             "-m", "syncnorm", "train", "--batch-sizes", "8,24", "--epochs", "1", "--no-progress",
             "--device", "cpu", "--coordinator", f"127.0.0.1:{running.grpc_port}", "--report-every", "5",
             "--run-id", "torchrun"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert _metric(running.metrics_port, "syncnorm_batch_size_mismatch_ratio", run="torchrun") == 3.0
        reports = _metric(running.metrics_port, "syncnorm_reports_total", run="torchrun")
        assert reports == 2 * math.ceil(44 / 5)  # 44 steps, reports at steps 0, 5, ..., 40, two workers
    finally:
        running.stop()


@pytest.mark.parametrize("running", ["all", "none", "some"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_built_reports_carry_the_layers_values(running: str, dtype: torch.dtype) -> None:
    """Packed when every layer (or none) has running buffers, one message per layer
    otherwise; packed blocks are float32 for a float32 model, float64 for a float64
    one; either way the coordinator reads back exactly the values given."""
    g = torch.Generator().manual_seed(0)
    xs = {"a": torch.randn(6, 3, 2, 2, generator=g, dtype=dtype),
          "b": torch.randn(6, 5, 2, 2, generator=g, dtype=dtype)}  # fmt: skip
    snaps = []
    for i, (name, x) in enumerate(xs.items()):
        buffers = (
            (x.mean((0, 2, 3)), x.var((0, 2, 3)))
            if running == "all" or (running == "some" and i == 0)
            else None
        )
        snaps.append(LayerSnapshot(name, local_moments(x, dtype), buffers))
    message = build_report({"run_id": "r", "worker_id": "w", "step": 1, "batch_size": 6}, snaps)
    assert message.HasField("packed") == (running != "some")
    if message.HasField("packed"):
        float32 = message.packed.value_type == PackedLayerStats.VALUE_TYPE_FLOAT32
        assert float32 == (dtype == torch.float32)
        assert len(message.packed.mean) == (4 if float32 else 8) * 8  # 8 channels
    report = parse_report(message)
    assert report.layers == ("a", "b")
    for snap in snaps:
        part = report.layout.slice(snap.name)
        assert torch.equal(report.mean[part], snap.local.mean.double())
        assert torch.equal(report.var[part], snap.local.biased_var.double())
        assert float(report.count[report.layout.index[snap.name]]) == float(snap.local.count)
        if snap.running is None:
            assert bool(report.running_mean[part].isnan().all())
        else:
            assert torch.equal(report.running_mean[part], snap.running[0].double())
            assert torch.equal(report.running_var[part], snap.running[1].double())

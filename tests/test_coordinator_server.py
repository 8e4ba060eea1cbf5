"""A real coordinator on loopback: gRPC with real stubs, /metrics parsed by prometheus-client."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from syncnorm.coordinator.server import SERVICE_NAME, RunningCoordinator, start_coordinator
from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from syncnorm.coordinator.v1 import coordinator_pb2_grpc as pb_grpc
from tests.processes import start_coordinator_command

DEADLINE_S = 10


@pytest.fixture
def served() -> Iterator[tuple[RunningCoordinator, pb_grpc.CoordinatorStub, grpc.Channel]]:
    running = start_coordinator(host="127.0.0.1")
    channel = grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    yield running, pb_grpc.CoordinatorStub(channel), channel
    channel.close()
    running.stop()


def _report(worker: str, batch: int, shift: float = 0.0, step: int = 1) -> pb.ReportRequest:
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch * 16, 3, generator=g, dtype=torch.float64) + shift
    layer = pb.LayerStats(
        layer="features.1", count=x.shape[0], mean=x.mean(0).tolist(), var=x.var(0, correction=0).tolist(),
        running_mean=[0.0] * 3, running_var=[1.0] * 3,
    )  # fmt: skip
    return pb.ReportRequest(
        run_id="demo", worker_id=worker, step=step, device_kind="cpu", batch_size=batch,
        step_time_seconds=0.05, layers=[layer],
    )  # fmt: skip


def _metrics(running: RunningCoordinator) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=DEADLINE_S) as r:
        text = r.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_reports_become_metrics_and_answers(served) -> None:
    running, stub, _ = served
    stub.Report(_report("w0", 8, shift=3.0), timeout=DEADLINE_S)  # a quarter of the data, shifted by 3
    assert stub.Report(_report("w1", 24), timeout=DEADLINE_S).reports_received == 2
    metrics = _metrics(running)
    assert metrics[("syncnorm_batch_size_mismatch_ratio", (("run", "demo"),))] == 3.0
    assert metrics[("syncnorm_global_batch_size", (("run", "demo"),))] == 32
    assert metrics[("syncnorm_worker_batch_size", (("run", "demo"), ("worker", "w1")))] == 24
    assert metrics[("syncnorm_reports_total", (("run", "demo"),))] == 2
    assert metrics[("syncnorm_workers", (("run", "demo"), ("state", "live")))] == 2
    shifted = metrics[("syncnorm_worker_stats_drift", (("run", "demo"), ("worker", "w0")))]
    other = metrics[("syncnorm_worker_stats_drift", (("run", "demo"), ("worker", "w1")))]
    # global mean 0.75 and variance 1 + 9 * 1/4 * 3/4: the shifted quarter reads 2.25 / 1.64
    assert shifted == pytest.approx(2.25 / (1 + 9 * 3 / 16) ** 0.5, rel=0.1)
    assert other == pytest.approx(0.75 / (1 + 9 * 3 / 16) ** 0.5, rel=0.15)
    assert metrics[("syncnorm_layer_stats_drift", (("layer", "features.1"), ("run", "demo")))] == shifted
    per_worker_and_layer = [
        name for name, labels in metrics if ("worker", "w0") in labels and ("layer", "features.1") in labels
    ]
    assert per_worker_and_layer == []  # bounded cardinality

    listed = stub.ListWorkers(pb.ListWorkersRequest(run_id="demo"), timeout=DEADLINE_S)
    assert [w.worker_id for w in listed.workers] == ["w0", "w1"]
    assert listed.batch_size_mismatch_ratio == 3.0 and listed.global_batch_size == 32
    assert [w.batch_share for w in listed.workers] == [0.25, 0.75]
    stats = stub.GetGlobalStats(pb.GetGlobalStatsRequest(run_id="demo"), timeout=DEADLINE_S)
    assert stats.layers[0].layer == "features.1" and stats.layers[0].count == 32 * 16
    advice = stub.RecommendBatchSizes(pb.RecommendBatchSizesRequest(run_id="demo", global_batch_size=64),
                                      timeout=DEADLINE_S)  # fmt: skip
    assert sum(advice.batch_sizes.values()) == 64 and advice.global_batch_size == 64


def test_a_bad_report_is_invalid_argument_counted_and_changes_nothing(served) -> None:
    running, stub, _ = served
    stub.Report(_report("w0", 8), timeout=DEADLINE_S)
    bad = _report("w1", 8)
    bad.layers[0].var[0] = -1.0
    with pytest.raises(grpc.RpcError) as info:
        stub.Report(bad, timeout=DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "var must be >= 0" in info.value.details()
    metrics = _metrics(running)
    assert metrics[("syncnorm_reports_rejected_total", (("reason", "negative"),))] == 1
    # every other reason is there from 0, so an alert sees the first rejection as an increase
    assert metrics[("syncnorm_reports_rejected_total", (("reason", "not_finite"),))] == 0
    assert metrics[("syncnorm_reports_total", (("run", "demo"),))] == 1
    listed = stub.ListWorkers(pb.ListWorkersRequest(run_id="demo"), timeout=DEADLINE_S)
    assert [w.worker_id for w in listed.workers] == ["w0"]


def test_unknown_runs_are_not_found_and_health_is_serving(served) -> None:
    _, stub, channel = served
    with pytest.raises(grpc.RpcError) as info:
        stub.ListWorkers(pb.ListWorkersRequest(run_id="nope"), timeout=DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_the_coordinator_command_serves_and_stops_on_sigterm() -> None:
    import signal

    process, grpc_port, metrics_port = start_coordinator_command()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            assert stub.Report(_report("w0", 4), timeout=DEADLINE_S).reports_received == 1
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=DEADLINE_S) as answer:
            assert 'syncnorm_global_batch_size{run="demo"} 4.0' in answer.read().decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE_S) == 0
    finally:
        process.kill()


def _view(grpc_port: int) -> tuple[object, object]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        workers = stub.ListWorkers(pb.ListWorkersRequest(run_id="demo"), timeout=DEADLINE_S)
        stats = stub.GetGlobalStats(pb.GetGlobalStatsRequest(run_id="demo"), timeout=DEADLINE_S)
    for w in workers.workers:  # ages differ between the two views
        w.ClearField("last_report_unix_seconds")
        w.ClearField("stale")
    return workers, stats


def test_a_coordinator_killed_mid_run_comes_back_with_everything_it_acknowledged(tmp_path) -> None:
    import signal

    process, grpc_port, _ = start_coordinator_command("--state-dir", str(tmp_path), "--stale-after", "3600")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            for step in range(1, 8):  # past OPEN_STEPS: some steps folded into the EMA, some open
                stub.Report(_report("w0", 8, shift=3.0 + step, step=step), timeout=DEADLINE_S)
                stub.Report(_report("w1", 24, step=step), timeout=DEADLINE_S)
            bad = _report("w1", 8)
            bad.layers[0].mean.append(0.0)
            with pytest.raises(grpc.RpcError):
                stub.Report(bad, timeout=DEADLINE_S)
        before = _view(grpc_port)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=DEADLINE_S)
    finally:
        process.kill()
    process, grpc_port, metrics_port = start_coordinator_command(
        "--state-dir", str(tmp_path), "--stale-after", "3600"
    )
    try:
        after = _view(grpc_port)
        assert after == before
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=DEADLINE_S) as answer:
            text = answer.read().decode()
        assert 'syncnorm_reports_total{run="demo"} 14.0' in text
        assert 'syncnorm_reports_rejected_total{reason="bad_shape"} 1.0' in text
        assert 'syncnorm_batch_size_mismatch_ratio{run="demo"} 3.0' in text
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=DEADLINE_S)


def test_status_table_and_loading_the_consensus_statistics(served) -> None:
    import subprocess
    import sys

    import syncnorm

    running, stub, _ = served
    batches = {"w0": 8, "w1": 24}
    for worker, batch in batches.items():
        stub.Report(_report(worker, batch), timeout=DEADLINE_S)
    address = f"127.0.0.1:{running.grpc_port}"
    status = subprocess.run(
        [sys.executable, "-m", "syncnorm", "status", "--coordinator", address, "--run", "demo"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "batch-size mismatch 3.00" in status.stdout
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[3:]}
    assert rows["w0"][3] == "8" and rows["w0"][4] == "25.0%" and rows["w1"][4] == "75.0%"
    missing = subprocess.run(
        [sys.executable, "-m", "syncnorm", "status", "--coordinator", address, "--run", "nope"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

    # a plain-BN model with the same layer name gets the exact pooled statistics
    model = torch.nn.Sequential()
    model.add_module("features", torch.nn.Sequential(torch.nn.Identity(), torch.nn.BatchNorm1d(3)))
    assert syncnorm.load_global_stats(model, address, "demo") == ["features.1"]
    pooled = torch.cat([
        torch.randn(n * 16, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        for n in batches.values()
    ])  # fmt: skip
    torch.testing.assert_close(model.features[1].running_mean, pooled.mean(0).float())
    torch.testing.assert_close(model.features[1].running_var, pooled.var(0).float())
    with pytest.raises(KeyError, match=r"features\.1"):
        syncnorm.load_global_stats(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), address, "demo")


def test_fuzzed_reports_never_take_the_server_down(served) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    running, stub, channel = served
    numbers = st.floats(allow_nan=True, allow_infinity=True, width=64)
    layers = st.lists(
        st.builds(pb.LayerStats, layer=st.text(max_size=12), count=numbers,
                  mean=st.lists(numbers, max_size=4), var=st.lists(numbers, max_size=4)),
        max_size=3,
    )  # fmt: skip

    @given(
        run_id=st.text(max_size=8), worker=st.text(max_size=8), batch=st.integers(-3, 10**6), layers=layers
    )
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    def send(run_id: str, worker: str, batch: int, layers: list) -> None:
        request = pb.ReportRequest(run_id=run_id, worker_id=worker, batch_size=batch, layers=layers)
        try:
            stub.Report(request, timeout=DEADLINE_S)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error

    send()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Report(_report("w0", 8), timeout=DEADLINE_S).reports_received >= 1
    _metrics(running)  # and /metrics still renders

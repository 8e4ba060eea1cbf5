"""The checked-in gRPC stubs are what the .proto generates, and they load."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("coordinator_pb2.py", "coordinator_pb2.pyi", "coordinator_pb2_grpc.py")


def test_regenerating_the_stubs_gives_no_diff(tmp_path: Path) -> None:
    subprocess.run(["bash", "scripts/generate-protos.sh", str(tmp_path)], cwd=ROOT, check=True, timeout=120)
    for name in GENERATED:
        fresh = (tmp_path / "syncnorm" / "coordinator" / "v1" / name).read_text()
        checked_in = (ROOT / "syncnorm" / "coordinator" / "v1" / name).read_text()
        assert fresh == checked_in, f"{name} is stale: run scripts/generate-protos.sh"


def test_stubs_import_and_round_trip_a_report() -> None:
    from syncnorm.coordinator.v1 import coordinator_pb2, coordinator_pb2_grpc

    report = coordinator_pb2.ReportRequest(
        run_id="r", worker_id="w0", step=3, batch_size=8,
        layers=[coordinator_pb2.LayerStats(layer="bn1", count=512, mean=[0.0, 1.0], var=[1.0, 2.0])],
    )  # fmt: skip
    again = coordinator_pb2.ReportRequest.FromString(report.SerializeToString())
    assert again.layers[0].mean == [0.0, 1.0] and again.batch_size == 8
    assert hasattr(coordinator_pb2_grpc, "CoordinatorServicer")

"""Bearer token and TLS on a real loopback coordinator, with a certificate made here."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import syncnorm
from syncnorm.coordinator.client import status_table
from syncnorm.coordinator.reporter import StatsReporter
from syncnorm.coordinator.security import call_metadata, open_channel
from syncnorm.coordinator.server import start_coordinator
from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from syncnorm.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

TOKEN = "s3cret-token"


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _report() -> pb.ReportRequest:
    layer = pb.LayerStats(layer="bn", count=8, mean=[0.0, 1.0], var=[1.0, 1.0])
    return pb.ReportRequest(run_id="secure", worker_id="w0", step=1, batch_size=8, layers=[layer])


def test_token_and_tls_guard_every_call_but_health() -> None:
    cert, key = _self_signed()
    running = start_coordinator(host="127.0.0.1", token=TOKEN, tls_cert_and_key=(cert, key))
    address = f"127.0.0.1:{running.grpc_port}"
    try:
        with open_channel(address, cert) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            for metadata in (None, call_metadata("wrong")):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Report(_report(), timeout=10, metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.Report(_report(), timeout=10, metadata=call_metadata(TOKEN)).reports_received == 1
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
        with grpc.insecure_channel(address) as plain:  # plaintext cannot talk to a TLS port
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.CoordinatorStub(plain).Report(_report(), timeout=5, metadata=call_metadata(TOKEN))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "w0" in status_table(address, "secure", token=TOKEN, root_certificates=cert)
        model = syncnorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
        reporter = StatsReporter(model, address, "secure", "w1", report_every=1, token=TOKEN,
                                 root_certificates=cert)  # fmt: skip
        model(torch.randn(4, 2))
        reporter.step(0, 4, 0.01)
        reporter.close()
        assert (reporter.sent, reporter.failed) == (1, 0)
    finally:
        running.stop()


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    from syncnorm.coordinator.security import read_token

    empty = tmp_path / "token"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(str(empty))

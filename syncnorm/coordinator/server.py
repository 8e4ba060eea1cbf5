"""Running the coordinator: a gRPC server (with the standard health service) and
a Prometheus ``/metrics`` endpoint."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from syncnorm.coordinator.security import TokenInterceptor
from syncnorm.coordinator.service import Coordinator, CoordinatorCollector, CoordinatorServicer
from syncnorm.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

SERVICE_NAME = "syncnorm.coordinator.v1.Coordinator"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest report accepted: ~2M float64 values, beyond any real model's BN layers."""


@dataclass
class RunningCoordinator:
    """A started coordinator; ``stop()`` shuts both endpoints down."""

    coordinator: Coordinator
    grpc_port: int
    metrics_port: int
    server: grpc.Server
    metrics_server: object

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait()
        self.metrics_server.shutdown()  # type: ignore[attr-defined]
        if self.coordinator.store is not None:
            self.coordinator.store.close()


def start_coordinator(
    host: str = "127.0.0.1",
    grpc_port: int = 0,
    metrics_port: int = 0,
    coordinator: Coordinator | None = None,
    workers: int = 8,
    token: str | None = None,
    tls_cert_and_key: tuple[bytes, bytes] | None = None,
) -> RunningCoordinator:
    """Start serving; port 0 picks a free port (see the returned ports).

    ``token``: require ``authorization: Bearer <token>`` on every call but health
    checks.  ``tls_cert_and_key``: PEM certificate chain and private key; the gRPC
    port then speaks TLS only.
    """
    coordinator = coordinator or Coordinator()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=[TokenInterceptor(token)] if token else [],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    )
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coordinator), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{grpc_port}"
    if tls_cert_and_key is None:
        bound = server.add_insecure_port(address)
    else:
        cert, key = tls_cert_and_key
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(coordinator))
    metrics_server, _thread = start_http_server(metrics_port, addr=host, registry=registry)
    return RunningCoordinator(coordinator, bound, metrics_server.server_port, server, metrics_server)

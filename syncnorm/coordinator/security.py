"""Bearer-token authentication and TLS for the coordinator, both optional.

With a token, every call except the standard health service must carry the
metadata ``authorization: Bearer <token>``; others get ``UNAUTHENTICATED``.
Clients pass the token with :func:`call_metadata` and, for TLS, the
certificate authority with :func:`open_channel`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without the bearer token (health checks stay open for probes)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the coordinator token is empty")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        if details.method.startswith(HEALTH_PREFIX):
            return continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return continuation(details)
        return grpc.unary_unary_rpc_method_handler(_refuse)


def _refuse(_request: object, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def read_token(path: str | None) -> str | None:
    """The token in ``path`` (surrounding whitespace removed), or None without a path."""
    if path is None:
        return None
    with open(path) as file:
        token = file.read().strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def read_bytes(path: str | None) -> bytes | None:
    """The bytes of ``path`` (a PEM certificate or key), or None without a path."""
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def open_channel(address: str, root_certificates: bytes | None = None) -> grpc.Channel:
    """A channel to the coordinator: TLS when a CA certificate is given."""
    if root_certificates is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root_certificates))

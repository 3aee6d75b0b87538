"""How the broker, its agents and its clients reach each other over gRPC: message size limits,
channel options, the control-stream protocol version, bearer metadata and TLS credentials."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "AGENT_CHANNEL_OPTIONS",
    "AUTHORIZATION_HEADER",
    "CLIENT_CHANNEL_OPTIONS",
    "CONTROL_PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "SERVER_OPTIONS",
    "bearer_metadata",
    "bearer_token",
    "client_credentials",
    "server_options",
]

MAX_MESSAGE_BYTES = 16 << 20
"""Largest gRPC message either way, on every end: 16x the 1 MiB data chunk, room for headers
with a wide margin and far below anything that could hurt."""

_MESSAGE_LIMITS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

_KEEPALIVE_TIME_MS = 20_000

# Pings find a dead peer (or NAT that dropped the idle connection) within ~30 s.
_KEEPALIVE: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)

CLIENT_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = _MESSAGE_LIMITS
"""Options of a user's channel to the broker (``Client``, ``AsyncClient``)."""

AGENT_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    *_MESSAGE_LIMITS,
    *_KEEPALIVE,
    ("grpc.http2.max_pings_without_data", 0),
)
"""Options of every channel an agent opens: it keeps its control stream alive with pings."""

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *_MESSAGE_LIMITS,
    *_KEEPALIVE,
    # Half the agents' ping interval, so an agent's keepalive pings are never counted as abuse.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", _KEEPALIVE_TIME_MS // 2),
    # A peer pinging faster than that twice is sent GOAWAY (keepalive enforcement).
    ("grpc.http2.max_ping_strikes", 2),
)
"""Options of the broker's gRPC server that are not configurable (see ``server_options``)."""


def server_options(
    *,
    max_connection_idle_ms: int,
    max_connection_age_ms: int,
    max_connection_age_grace_ms: int | None,
    max_concurrent_streams: int,
    max_metadata_bytes: int,
) -> tuple[tuple[str, int], ...]:
    """``SERVER_OPTIONS`` and the limits on what one connection may hold.

    Idle connections are closed, every connection is asked to go away at its age (its running
    calls get ``max_connection_age_grace_ms`` more; None: until they end), and its concurrent
    streams and each call's metadata are bounded.
    """
    grace = (
        ()
        if max_connection_age_grace_ms is None
        else (("grpc.max_connection_age_grace_ms", max_connection_age_grace_ms),)
    )
    return (
        *SERVER_OPTIONS,
        ("grpc.max_connection_idle_ms", max_connection_idle_ms),
        ("grpc.max_connection_age_ms", max_connection_age_ms),
        *grace,
        ("grpc.max_concurrent_streams", max_concurrent_streams),
        ("grpc.max_metadata_size", max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", max_metadata_bytes),
    )


CONTROL_PROTOCOL_VERSION = 2
"""The agent control-stream protocol this build speaks; each end uses the lower of the two
versions announced. Version 2 adds batches, and results and draining notices on the control
stream; against a peer that speaks only 1 (or announces nothing), each message is written on
its own and every result goes through ``PutResult``."""

RETRY_AFTER_HEADER = "gpubroker-retry-after-s"
"""Trailing metadata of a refusal that is worth repeating: the seconds to wait first (the
broker's spool disk is below its free floor; the broker keeps the attempt leased meanwhile)."""
RETRY_AFTER_S = 5.0
"""The wait ``RETRY_AFTER_HEADER`` asks for when the spool's disk is full."""

AUTHORIZATION_HEADER = "authorization"
"""The metadata key carrying an API key (clients) or the join token (agents)."""

_BEARER = "Bearer"


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata presenting ``token`` as ``authorization: Bearer <token>``; none for None."""
    return ((AUTHORIZATION_HEADER, f"{_BEARER} {token}"),) if token else ()


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry of ``metadata``, if any."""
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION_HEADER:
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == _BEARER.lower() and token.strip():
                return token.strip()
    return None


def client_credentials(
    ca_file: str | Path | None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """Channel credentials for a client or agent: trust ``ca_file`` (system roots when None),
    and present ``cert_file`` / ``key_file`` to a broker that requires client certificates.

    The files are read here, once.

    Raises:
        ValueError: only one of ``cert_file`` and ``key_file`` is given.
        OSError: a file cannot be read.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key: give both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file is not None else None,
        private_key=Path(key_file).read_bytes() if key_file is not None else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file is not None else None,
    )

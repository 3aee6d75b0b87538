"""Agent settings: one frozen ``Settings``, parsed once in ``__main__``."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Settings"]


def _default_agent_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the agent process is configured with."""

    broker_address: str = "127.0.0.1:50051"
    """host:port of the broker's gRPC server."""
    agent_id: str = field(default_factory=_default_agent_id)
    """Stable id; a VM's name is a good choice."""
    slots: int = 2
    """How many tasks run at once."""
    device: str = "auto"
    """``auto`` (CUDA if present), ``cpu`` or ``cuda``."""
    join_token: str | None = None
    """Token the broker asks agents for."""
    reconnect_initial_s: float = 0.1
    """First reconnect delay; doubles up to ``reconnect_max_s``."""
    reconnect_max_s: float = 5.0
    """Longest reconnect delay."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Reads ``GPUBROKER_AGENT_*`` variables; unset ones keep their defaults."""
        defaults = cls()
        get = environ.get
        return cls(
            broker_address=get("GPUBROKER_AGENT_BROKER", defaults.broker_address),
            agent_id=get("GPUBROKER_AGENT_ID", defaults.agent_id),
            slots=int(get("GPUBROKER_AGENT_SLOTS", str(defaults.slots))),
            device=get("GPUBROKER_AGENT_DEVICE", defaults.device),
            join_token=get("GPUBROKER_JOIN_TOKEN") or None,
        )

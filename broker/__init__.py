"""The GPU broker: durable task queue, agent dispatch, leases, and the gRPC services."""

from __future__ import annotations

__all__: list[str] = []

"""Refused agent joins, logged at WARNING once per peer host per minute.

An agent with a wrong join token retries every few seconds, forever: logging each refusal
would flood the log, logging none leaves the operator guessing why a machine never joins.
``RefusalLog`` logs the first refusal from a host, then at most one a minute with the count of
those it held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RefusalLog", "peer_host"]

logger = logging.getLogger("gpubroker.broker.access")

_WINDOW_S = 60.0
_MAX_PEERS = 4096
"""Hosts remembered at most; past it, those not refused within the window are forgotten."""


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:10.0.0.5:41234`` -> ``10.0.0.5``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _ = rest.rpartition(":")
        return host.strip("[]") or rest
    return peer


class RefusalLog:
    """Logs refused joins; at most one line per host per minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # host -> (logged at, refusals held back)

    def refused(self, peer: str, reason: str) -> bool:
        """Notes one refusal of ``peer``; True when it was logged."""
        host, now = peer_host(peer), self._clock()
        logged_at, held = self._last.get(host, (None, 0))
        if logged_at is not None and now - logged_at < _WINDOW_S:
            self._last[host] = (logged_at, held + 1)
            return False
        if len(self._last) >= _MAX_PEERS:
            self._last = {h: v for h, v in self._last.items() if now - v[0] < _WINDOW_S}
        self._last[host] = (now, 0)
        more = f" ({held} more refused in the last minute)" if held else ""
        logger.warning("refused an agent join from %s: %s%s", host, reason, more)
        return True

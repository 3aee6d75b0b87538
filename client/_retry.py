"""Riding through a broker restart: which failures are worth another try, and when to try.

A broker restart (or a dropped connection) fails the calls in flight with ``UnavailableError``
(UNAVAILABLE, or gRPC's "Stream removed" and the like). ``submit``, the
task handles' calls and ``watch`` try again, with exponential backoff and full jitter, for
up to ``retry_for`` seconds of failures in a row: ``submit`` is idempotent by its request id,
and the others only read or (``cancel``) ask for the same final state. A ``submit`` refused by
the broker's per-tenant submit rate (RESOURCE_EXHAUSTED, "... retry in 0.012 s") waits the
time the broker names, plus the same jitter, and tries again within the same ``retry_for``:
a client that submits faster than its rate is slowed to it instead of failing. Other
RESOURCE_EXHAUSTED refusals (sizes, queue cap, quotas, budgets) are raised at once.
``Retrier`` holds one call's clock; ``retrying`` and ``retrying_async`` run the loop.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from gpubroker.client.errors import (
    DeadlineExceededError,
    GpuBrokerError,
    ResourceExhaustedError,
    UnavailableError,
)
from gpubroker.protos.transport import CLIENT_CHANNEL_OPTIONS

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_RETRY_FOR_S",
    "FIRST_BACKOFF_S",
    "MAX_BACKOFF_S",
    "Retrier",
    "is_transient",
    "rate_limit_wait",
    "retrying",
    "retrying_async",
]

_T = TypeVar("_T")

DEFAULT_RETRY_FOR_S = 60.0
"""How long a call keeps retrying a broker it cannot reach (long enough for a restart)."""

FIRST_BACKOFF_S = 0.1
"""Upper bound of the first pause; each later one doubles, up to ``MAX_BACKOFF_S``."""

MAX_BACKOFF_S = 2.0
"""Upper bound of any pause between two tries."""

_MAX_RECONNECT_BACKOFF_MS = 2_000

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    *CLIENT_CHANNEL_OPTIONS,
    # gRPC's own reconnect backoff grows to 120 s by default: a broker back after 10 s would be
    # found only ~16 s later, while every try in between fails at once with UNAVAILABLE.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
)
"""Options of the client's channel: the shared ones, and a short reconnect backoff."""


# A TLS handshake that fails (an untrusted or wrong certificate) fails the same way every time.
_HANDSHAKE_FAILED = re.compile(r"handshake failed|SSL_ERROR|CERTIFICATE_VERIFY", re.IGNORECASE)


# The broker's refusal of a submit over the tenant's rate (broker/core/quota.py), which names
# when a token will be there; tests/client/test_rate_limit.py holds the two sides together.
_RATE_LIMITED = re.compile(r"over its submit rate\b.*\bretry in (\d+(?:\.\d+)?) s")


def rate_limit_wait(error: GpuBrokerError) -> float | None:
    """Seconds the broker asks a submit refused by the tenant's submit rate to wait, or None
    for any other error."""
    if not isinstance(error, ResourceExhaustedError):
        return None
    found = _RATE_LIMITED.search(error.details)
    return None if found is None else float(found.group(1))


def is_transient(error: GpuBrokerError) -> bool:
    """True for a failure a broker restart explains: UNAVAILABLE, or a lost connection (which
    ``errors.error_from_rpc`` reports as ``UnavailableError`` too), but not a TLS handshake
    that failed."""
    return isinstance(error, UnavailableError) and not _HANDSHAKE_FAILED.search(error.details)


class Retrier:
    """One call's tries: the pause before the next one, and the time left of its timeout.

    Args:
        retry_for: Seconds of failures in a row to go on through; 0 never retries.
        timeout: The call's own timeout across all its tries, or None.
    """

    def __init__(self, retry_for: float, timeout: float | None = None) -> None:
        now = time.monotonic()
        self._retry_for = retry_for
        self._give_up_at = now + retry_for
        self._deadline = None if timeout is None else now + timeout
        self._timeout = timeout
        self._backoff = FIRST_BACKOFF_S

    def remaining(self) -> float | None:
        """Seconds left of the call's timeout (never below 0), or None for no timeout."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def progressed(self) -> None:
        """The call got an answer: a later failure starts a fresh ``retry_for`` period."""
        self._give_up_at = time.monotonic() + self._retry_for
        self._backoff = FIRST_BACKOFF_S

    def pause(self, error: GpuBrokerError) -> float:
        """How long to wait before trying again after ``error``.

        A transient error waits a random time below a bound that doubles with each try (full
        jitter); a submit refused by the tenant's rate waits what the broker names and then
        such a random time, so the callers it turned away do not all come back at once.

        Raises:
            GpuBrokerError: ``error`` itself, when it is neither transient nor a rate-limit
                refusal, or ``retry_for`` ran out.
            DeadlineExceededError: The call's timeout would pass before the next try.
        """
        asked = rate_limit_wait(error)
        if asked is None and not is_transient(error):
            raise error
        now = time.monotonic()
        delay = (asked or 0.0) + random.uniform(0.0, self._backoff)  # restarts see no herd
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        if self._deadline is not None and now + delay >= self._deadline:
            cause = "could not be reached" if asked is None else "refused it for its submit rate"
            raise DeadlineExceededError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{self._timeout} s passed while the broker {cause}; last: {error}",
            ) from error
        if now >= self._give_up_at:
            raise error
        return min(delay, self._give_up_at - now)  # one last try as the period ends


def retrying(attempt: Callable[[Retrier], _T], retry_for: float, timeout: float | None) -> _T:
    """``attempt(retrier)`` until it succeeds or fails for good (see ``Retrier.pause``)."""
    retry = Retrier(retry_for, timeout)
    while True:
        try:
            return attempt(retry)
        except GpuBrokerError as exc:
            delay = retry.pause(exc)
        time.sleep(delay)


async def retrying_async(
    attempt: Callable[[Retrier], Awaitable[_T]], retry_for: float, timeout: float | None
) -> _T:
    """``retrying`` for coroutines: awaits ``attempt(retrier)`` and sleeps without blocking."""
    retry = Retrier(retry_for, timeout)
    while True:
        try:
            return await attempt(retry)
        except GpuBrokerError as exc:
            delay = retry.pause(exc)
        await asyncio.sleep(delay)

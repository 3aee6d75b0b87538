"""Per-tenant submit quotas: a token bucket for the submit rate and a cap on queued tasks.

Pure bookkeeping: the clock and the queued-task count are handed in, so tests drive both.
``TaskService.submit`` asks for admission once a task's header checked out and before a byte
of it is spooled, so a tenant over its quota costs the broker no disk and no SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator

from gpubroker.broker.errors import LimitExceededError

__all__ = ["SubmitQuota", "TokenBucket"]


class TokenBucket:
    """Holds up to ``burst`` tokens and gains ``rate_per_s`` a second; a task takes one."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float, tokens: int = 1) -> bool:
        """Takes ``tokens`` if the bucket holds them; False (taking none) otherwise."""
        self._refill(now)
        if self._tokens < tokens:
            return False
        self._tokens -= tokens
        return True

    def wait_s(self, now: float, tokens: int = 1) -> float:
        """Seconds until ``tokens`` are available (0 when they are now)."""
        self._refill(now)
        return max(0.0, (tokens - self._tokens) / self._rate)

    def _refill(self, now: float) -> None:
        # A clock that steps back (it should not: time.monotonic) adds nothing.
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now


class SubmitQuota:
    """Admits a tenant's submits while it is under its rate and its queued-task cap.

    ``queued(tenant)`` counts the tenant's queued tasks (``FairQueue.queued``). Tasks admitted
    but not yet queued (their bytes are still arriving) count too, so concurrent submits
    cannot overshoot the cap.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_queued: int,
        queued: Callable[[str], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate_per_s = rate_per_s
        self._burst = burst
        self._max_queued = max_queued
        self._queued = queued
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._pending: Counter[str] = Counter()

    async def pace(self, tenant: str, tasks: int) -> None:
        """Waits until ``tenant``'s rate allows ``tasks`` more submits and takes their tokens.

        For a batch caller (``RunMany``): a stream is slowed down to the rate, through gRPC flow
        control, instead of having its tasks refused. Its submits then ``admit(paid=True)``.
        """
        bucket = self._bucket(tenant)
        left = tasks
        while left > 0:
            take = min(left, self._burst)
            now = self._clock()
            if bucket.take(now, take):
                left -= take
            else:
                await asyncio.sleep(bucket.wait_s(now, take))

    @contextlib.contextmanager
    def admit(self, tenant: str, *, paid: bool = False) -> Iterator[None]:
        """Holds a queue place for one task of ``tenant`` until the block ends.

        ``paid``: its rate token was already taken by ``pace``.

        Raises:
            LimitExceededError: the tenant has its maximum of tasks queued, or is over its
                submit rate. A task refused for its queue takes no token.
        """
        self._check_queued(tenant)
        if not paid:
            self._take_token(tenant)
        self._pending[tenant] += 1
        try:
            yield
        finally:
            self._pending[tenant] -= 1
            if not self._pending[tenant]:
                del self._pending[tenant]

    def _check_queued(self, tenant: str) -> None:
        queued = self._queued(tenant) + self._pending[tenant]
        if queued >= self._max_queued:
            raise LimitExceededError(
                f"tenant {tenant!r} has {queued} tasks queued, the limit "
                f"(max_queued_per_tenant) is {self._max_queued}: wait for some to start"
            )

    def _bucket(self, tenant: str) -> TokenBucket:
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = TokenBucket(
                self._rate_per_s, self._burst, self._clock()
            )
        return bucket

    def _take_token(self, tenant: str) -> None:
        now = self._clock()
        bucket = self._bucket(tenant)
        if not bucket.take(now):
            raise LimitExceededError(
                f"tenant {tenant!r} is over its submit rate of {self._rate_per_s:g} tasks/s "
                f"(submit_rate_per_s, burst {self._burst}): retry in "
                f"{bucket.wait_s(now):.3f} s"
            )

"""Exponential backoff for launches that keep failing: stuck boots and stockouts.

A launch whose machine never connects (a broken image or startup script), or that finds no
capacity, is likely to fail the same way if repeated at once; without a pause the autoscaler
would start (and pay the billing minimum of) a doomed machine every few seconds. So each
failure *holds* its key (a GPU type, or a GPU type in a zone) for a delay that starts at
``initial_s`` and doubles with every further failure up to ``max_s``; a success (an agent
connected, a machine created) forgets the failures.

Failures that arrive while the key is held do not lengthen the hold: they come from launches
started before it (several machines of one scale-up stuck together), which say nothing new.

Pure: no I/O and no clock. Callers pass the time (seconds on any monotonic clock) to every
method, so tests drive it with plain numbers.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BackoffPolicy", "Hold", "LaunchBackoff"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How long failures hold further launches."""

    initial_s: float = 30.0
    """Hold after the first failure."""
    max_s: float = 900.0
    """Longest hold, however many failures."""
    factor: float = 2.0
    """Each further failure multiplies the hold by this."""

    def __post_init__(self) -> None:
        if not 0 <= self.initial_s <= self.max_s or self.factor < 1:
            raise ValueError(
                f"need 0 <= initial_s <= max_s and factor >= 1, got {self.initial_s}, "
                f"{self.max_s} and {self.factor}"
            )

    def delay_s(self, failures: int) -> float:
        """The hold after ``failures`` failures in a row (at least one)."""
        if failures < 1:
            raise ValueError(f"a hold needs at least one failure, not {failures}")
        # Past max_s the power only grows; cap the exponent so it cannot overflow.
        return min(self.initial_s * self.factor ** min(failures - 1, 64), self.max_s)


@dataclass(frozen=True, slots=True)
class Hold(Generic[K]):
    """One key's standing: failures in a row and when its hold ends."""

    key: K
    failures: int
    """Failures since the last success."""
    until_s: float
    """When launches for the key may go ahead again."""
    cause: str
    """The last failure, for people."""

    def remaining_s(self, now_s: float) -> float:
        """Seconds the hold still lasts at ``now_s``; 0 once over."""
        return max(self.until_s - now_s, 0.0)


class LaunchBackoff(Generic[K]):
    """Failures and holds per key; see the module docstring."""

    def __init__(self, policy: BackoffPolicy | None = None) -> None:
        self.policy = policy or BackoffPolicy()
        self._holds: dict[K, Hold[K]] = {}
        self._announced: set[K] = set()

    def fail(self, key: K, now_s: float, cause: str) -> Hold[K]:
        """Records a failure for ``key``; returns its hold, longer unless it was held already."""
        hold = self._holds.get(key)
        if hold is not None and hold.remaining_s(now_s) > 0:
            return hold
        failures = 1 if hold is None else hold.failures + 1
        hold = Hold(key, failures, now_s + self.policy.delay_s(failures), cause)
        self._holds[key] = hold
        self._announced.discard(key)
        return hold

    def succeed(self, key: K) -> bool:
        """Forgets ``key``'s failures; True when there were any."""
        self._announced.discard(key)
        return self._holds.pop(key, None) is not None

    def remaining_s(self, key: K, now_s: float) -> float:
        """Seconds until launches for ``key`` may go ahead; 0 when they may now."""
        hold = self._holds.get(key)
        return 0.0 if hold is None else hold.remaining_s(now_s)

    def hold(self, key: K) -> Hold[K] | None:
        """``key``'s standing, over or not; None when it has no failures since a success."""
        return self._holds.get(key)

    def holds(self) -> list[Hold[K]]:
        """Every key with failures since its last success, current holds and expired ones."""
        return list(self._holds.values())

    def announce(self, key: K) -> bool:
        """True the first time it is asked about ``key`` during each of its holds.

        Lets the caller log a refused launch once per hold rather than at every decision.
        """
        if key in self._announced or key not in self._holds:
            return False
        self._announced.add(key)
        return True

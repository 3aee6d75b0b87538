"""Splits one device's busy time between the tasks that share it (processor sharing).

A runner with several slots runs that many tasks at once on one device. Timing each alone
would bill two tasks that overlap for 10 s twenty seconds of a device that was busy for ten.
``DeviceMeter`` bills instead each task's compute window as the integral over it of dt / n(t),
n(t) being the number of windows open at t: a second in which two tasks run is half a second
for each, a second in which one runs is a second for it. So the shares of all windows add up to
the measure of their union, never more than the device's wall time, and a task alone is billed
its window's length.

It is computed online with a virtual clock: V advances by dt / n between events (by nothing
while no window is open), and a window's share is V at its close less V at its open. The
clock's nanoseconds and V are exact integers and fractions, so the shares add up to the union
to the nanosecond before each is rounded to a float once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from fractions import Fraction

__all__ = ["DeviceMeter"]

_NS_PER_S = 1_000_000_000


class DeviceMeter:
    """Processor-sharing accounting of one device's compute windows; thread-safe.

    Args:
        clock: monotonic nanoseconds (``time.monotonic_ns``; tests pass a fake).
    """

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._opened_at: dict[int, Fraction] = {}  # open window's token -> V when it opened
        self._virtual = Fraction(0)  # V: a window open throughout has this much billed
        self._last_ns = 0
        self._next_token = 0
        self._busy_ns = 0
        self._slot_ns = 0
        self._billed = Fraction(0)

    def enter(self) -> int:
        """Opens a compute window now; returns its token for ``leave``."""
        with self._lock:
            self._advance()
            token = self._next_token
            self._next_token += 1
            self._opened_at[token] = self._virtual
            return token

    def leave(self, token: int) -> float:
        """Closes the window ``token`` now; returns its share in seconds.

        Raises:
            KeyError: ``token`` is not an open window of this meter.
        """
        with self._lock:
            self._advance()
            share = self._virtual - self._opened_at.pop(token)
            self._billed += share
            return float(share / _NS_PER_S)

    @property
    def busy_seconds(self) -> float:
        """Seconds in which at least one window was open, up to now (the union's measure)."""
        with self._lock:
            self._advance()
            return self._busy_ns / _NS_PER_S

    @property
    def slot_seconds(self) -> float:
        """Seconds of windows open, summed over windows (two overlapping for 10 s: 20), up to
        now: the slots' busy time; over ``slots`` times wall time, their utilization."""
        with self._lock:
            self._advance()
            return self._slot_ns / _NS_PER_S

    @property
    def billed_seconds(self) -> float:
        """The shares handed out by ``leave`` so far; ``busy_seconds`` when no window is open."""
        with self._lock:
            return float(self._billed / _NS_PER_S)

    @property
    def open_windows(self) -> int:
        """How many windows are open now."""
        with self._lock:
            return len(self._opened_at)

    def _advance(self) -> None:
        now = self._clock()
        if self._opened_at:
            elapsed = max(now - self._last_ns, 0)  # a clock never runs back; a fake might
            self._virtual += Fraction(elapsed, len(self._opened_at))
            self._busy_ns += elapsed
            self._slot_ns += elapsed * len(self._opened_at)
        self._last_ns = max(now, self._last_ns)

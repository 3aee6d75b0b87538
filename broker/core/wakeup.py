"""The dispatch loop's alarm: rung now by whatever frees a slot or queues a task, or later at a
given time (when a model task's wait for an agent holding its model ends)."""

from __future__ import annotations

import asyncio

__all__ = ["Wakeup"]


class Wakeup:
    """An ``asyncio.Event`` that the loop clears as it wakes, plus one timer."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def set(self) -> None:
        """Wakes the loop now."""
        self._event.set()

    async def wait(self) -> None:
        """Waits until woken, then clears the alarm for the next round."""
        await self._event.wait()
        self._event.clear()

    def at(self, when: float, now: float) -> None:
        """Wakes the loop at monotonic time ``when`` (``now`` is the caller's clock)."""
        if self._timer is not None:
            if now < self._timer_at <= when:
                return  # an earlier round is due anyway
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_later(
            max(when - now, 0.0) + 0.001, self._event.set
        )

    def cancel(self) -> None:
        """Drops the timer (on stop)."""
        if self._timer is not None:
            self._timer.cancel()

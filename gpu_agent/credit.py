"""How many tasks the agent holds at once: its slots, plus a prefetch sized to its tasks.

With only ``slots`` tasks held, every slot idles for a round trip to the broker (result up,
next assignment down) after each task. For a 10 s GPU task that is nothing; for a 1 ms task it
is most of the time. Holding more tasks than slots hides the round trip, but a task held here
waits for this agent even when another agent is idle. So the prefetch covers a fixed stretch of
work, ``horizon_s``: ``slots * horizon_s / mean task time`` tasks, at most ``max_prefetch``.
Long tasks (mean at or above the horizon) get at most one per slot; tiny ones get the maximum.
Pure logic, no I/O; the ``Agent`` feeds it measured task times and grants credit from it.
"""

from __future__ import annotations

import math

__all__ = ["CreditPolicy"]


class CreditPolicy:
    """The number of tasks to hold, from an exponentially weighted mean of task times."""

    def __init__(
        self, slots: int, max_prefetch: int, horizon_s: float, smoothing: float = 0.2
    ) -> None:
        if slots < 1 or max_prefetch < 0 or horizon_s < 0 or not 0 < smoothing <= 1:
            raise ValueError(
                f"need slots >= 1, max_prefetch >= 0, horizon_s >= 0 and 0 < smoothing <= 1; "
                f"got {slots}, {max_prefetch}, {horizon_s}, {smoothing}"
            )
        self.slots = slots
        self.max_prefetch = max_prefetch
        self.horizon_s = horizon_s
        self._smoothing = smoothing
        self.mean_s = horizon_s
        """Smoothed task time; it starts at the horizon (a prefetch of one per slot)."""

    def observe(self, seconds: float) -> None:
        """Folds in one finished task's time on its slot."""
        self.mean_s += self._smoothing * (max(seconds, 0.0) - self.mean_s)

    @property
    def prefetch(self) -> int:
        """Tasks to hold beyond the slots now."""
        if self.max_prefetch == 0 or self.horizon_s == 0:
            return 0
        if self.mean_s <= 0:
            return self.max_prefetch
        wanted = math.floor(self.slots * self.horizon_s / self.mean_s + 1e-9)  # 9.999... is 10
        return max(0, min(self.max_prefetch, wanted))

    @property
    def capacity(self) -> int:
        """Tasks to hold in all: slots plus prefetch."""
        return self.slots + self.prefetch

    def capacity_for_batch(self, batch_tasks: int) -> int:
        """Tasks to hold while a model batching up to ``batch_tasks`` tasks runs here.

        The prefetch is then at least ``batch_tasks`` (up to ``max_prefetch``), so that a batch
        can fill even before the task times have driven the prefetch up.
        """
        return self.slots + max(self.prefetch, min(batch_tasks, self.max_prefetch))

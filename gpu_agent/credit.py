"""How many tasks the agent holds at once: its slots, plus a prefetch sized to its tasks.

With only ``slots`` tasks held, every slot idles after each task for a round trip to the broker
(result up, next assignment down) and for the next task's inputs to arrive: for a 1 ms task
most of its time, and for a task with 64 MiB of inputs a transfer whatever its length. So the
agent always holds one more task per slot, whose inputs arrive while the slot computes, and
for short tasks enough to cover a fixed stretch of work, ``horizon_s``: ``slots * horizon_s /
mean task time`` tasks, at most ``max_prefetch``. Long tasks get one per slot; tiny ones the
maximum. A task held here but not started is not stuck when another agent idles: the broker
takes it back for that agent (``broker/core/spread.py``).
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
        return min(self.max_prefetch, max(self.slots, wanted))

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

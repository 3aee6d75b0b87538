"""How many machines queued work is worth starting: work against boot time, and the delay knob.

Pure arithmetic for the autoscaling policy: no grpc, no I/O, no clock. A new machine is billed
for its whole boot before it runs anything (GCE bills from RUNNING; the agent connects a boot
later), so a machine is worth starting only for work that dwarfs that boot. ``worth_starting``
counts the machines whose share of the queued work is at least ``work_boots`` boots, after
the machines already serving have done what they do while the new ones boot. The first machine
for work nothing serves is always worth it: work must run.

``max_queue_delay_s`` trades waiting for cost. At 0 (the default) machines are started as
soon as work is worth them. Above 0 the first machine for waiting work starts only once the
oldest task has waited ``max_queue_delay_s`` less a boot (it then arrives about when the delay
runs out, and finds everything that queued meanwhile), and more machines start only when the
ones serving would leave the last queued task waiting longer than the delay (and only as many
as are also worth starting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Fleet", "first_start_due", "needed_for_delay", "worth_starting"]


@dataclass(frozen=True, slots=True)
class Fleet:
    """The machines that may serve some queued work, and that work."""

    queued: int
    """Tasks waiting for a slot."""
    run_s: float
    """Expected device-seconds per task (learned)."""
    boot_s: float
    """Expected boot, start to agent connected (learned)."""
    connected: int = 0
    """Machines serving now."""
    booting: int = 0
    """Machines started (or being started) whose agent has not connected yet."""

    @property
    def work_s(self) -> float:
        """Device-seconds of queued work."""
        return self.queued * self.run_s

    @property
    def serving(self) -> int:
        """Machines serving now or soon."""
        return self.connected + self.booting


def worth_starting(fleet: Fleet, wanted: int, work_boots: float) -> int:
    """How many of ``wanted`` new machines would each get at least ``work_boots`` boots of work.

    While a new machine boots, each connected one works through a boot of the queue and each
    booting one, on average, half a boot; the rest is shared evenly by all. The first machine
    for work that nothing serves is always worth starting.
    """
    if wanted <= 0 or fleet.queued <= 0:
        return 0
    left = fleet.work_s - (fleet.connected + fleet.booting / 2) * fleet.boot_s
    count = 0
    while count < wanted and left / (fleet.serving + count + 1) >= work_boots * fleet.boot_s:
        count += 1
    if count == 0 and fleet.serving == 0:
        return 1
    return count


def first_start_due(oldest_wait_s: float, boot_s: float, max_queue_delay_s: float) -> bool:
    """Whether work nothing serves should get its first machine now, under the delay knob."""
    return oldest_wait_s + boot_s >= max_queue_delay_s


def needed_for_delay(fleet: Fleet, max_queue_delay_s: float) -> int:
    """The fewest new machines that start the last queued task within the delay.

    The last task queued waits for the queue's work shared by the machines (new ones after
    their boot). Returns 0 when the serving machines manage alone, and the queue's length
    when no count would (the caller bounds it).
    """
    if fleet.serving and fleet.work_s / fleet.serving <= max_queue_delay_s:
        return 0
    room = max_queue_delay_s - fleet.boot_s
    if room <= 0:
        return max(fleet.queued, 1)
    return max(math.ceil(fleet.work_s / room) - fleet.serving, 1)

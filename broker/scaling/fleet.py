"""What the machines are doing and what they cost, tick by tick: plain arithmetic, no I/O.

The scaling loop lists the provider's instances every tick. ``FleetClock`` turns those lists
into the machines' states now (booting, running, stopping) and into the machine time and money
spent since the previous tick, per GPU type. A provider charges from RUNNING until the machine
is gone, boot included and work or not, so these totals beside the tasks' billed compute make
idle waste a graph (``gpubroker_machine_cost_nanousd_total`` less
``gpubroker_billed_nanousd_total``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gpubroker.billing.prices import prorated_nanousd
from gpubroker.broker.scaling.providers.base import Instance, InstanceStatus

__all__ = ["MACHINE_STATES", "FleetClock", "FleetTick", "machine_state"]

MACHINE_STATES = ("booting", "running", "stopping")
"""Values of the ``state`` label of ``gpubroker_machines``."""


def machine_state(status: InstanceStatus, connected: bool) -> str | None:
    """``booting`` (created, its agent not connected yet), ``running`` (its agent is),
    ``stopping``; None once terminated."""
    if status is InstanceStatus.TERMINATED:
        return None
    if status is InstanceStatus.STOPPING:
        return "stopping"
    return "running" if connected and status is InstanceStatus.RUNNING else "booting"


@dataclass(frozen=True, slots=True)
class FleetTick:
    """One tick's view: machines per ``(state, gpu_type)`` now, and time and spend since the
    previous tick per GPU type."""

    machines: Counter[tuple[str, str]] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    nanousd: Counter[str] = field(default_factory=Counter)


class FleetClock:
    """Accumulates machine time between ticks; one per scaling loop.

    Args:
        price_per_hour: an instance's hourly price in nano-USD (0 when unknown).
    """

    def __init__(self, price_per_hour: Callable[[Instance], int]) -> None:
        self._price = price_per_hour
        self._last_s: dict[str, float] = {}

    def tick(
        self, instances: Iterable[Instance], connected: Callable[[str], bool], now_s: float
    ) -> FleetTick:
        """The states of ``instances`` and what each charging one cost since the last tick.

        A machine is charged while RUNNING or STOPPING (the provider's billing), from the
        first tick that saw it so; its first tick adds nothing.
        """
        out = FleetTick()
        seen: dict[str, float] = {}
        for instance in instances:
            state = machine_state(instance.status, connected(instance.name))
            if state is None:
                continue
            out.machines[state, instance.gpu_type] += 1
            if instance.status not in (InstanceStatus.RUNNING, InstanceStatus.STOPPING):
                continue
            seen[instance.name] = now_s
            last = self._last_s.get(instance.name)
            if last is None or now_s <= last:
                continue
            elapsed = now_s - last
            out.seconds[instance.gpu_type] = out.seconds.get(instance.gpu_type, 0.0) + elapsed
            micros = round(elapsed * 1_000_000)
            out.nanousd[instance.gpu_type] += prorated_nanousd(
                micros, 3_600_000_000, self._price(instance)
            )
        self._last_s = seen
        return out

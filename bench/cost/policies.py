"""The policies the cost simulator compares: the broker's real ``Autoscaler`` and baselines.

``Ours`` builds each ``Snapshot`` the way ``broker/scaling/loop.py`` does and carries out the
real policy's ``Decision``. The baselines: ``AlwaysOn`` (``max_instances`` VMs from the start to
the last task's end), ``Autostop`` (launch one VM per ``slots`` queued tasks that no free or
booting slot covers; stop a VM once idle that long), and ``Oracle``, described on the class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bench.cost.sim import Simulation
from bench.cost.traces import SimTask
from gpubroker.broker.model import GpuRequirement
from gpubroker.broker.scaling.demand import Demand
from gpubroker.broker.scaling.policy import (
    Autoscaler,
    InstanceSnapshot,
    ScalingPolicy,
    Snapshot,
)
from gpubroker.broker.scaling.providers.base import InstanceStatus

__all__ = ["AlwaysOn", "Autostop", "Oracle", "Ours"]


class Ours:
    """The broker's ``Autoscaler``, fed snapshots as its scaling loop builds them."""

    def __init__(self, policy: ScalingPolicy, price_per_hour_nanousd: int) -> None:
        self.autoscaler = Autoscaler(policy)
        self._price = price_per_hour_nanousd
        self._seen: set[str] = set()
        self._runs_seen = 0

    def control(self, sim: Simulation, now_s: float) -> tuple[int, Sequence[str]]:
        """One tick of the loop: learn boots, snapshot, decide."""
        live = sim.live_vms()
        gpu_type = self.autoscaler.policy.launch_request.gpu_types[0]
        for vm in live:
            if vm.connected_s is not None and vm.name not in self._seen:
                self._seen.add(vm.name)  # the loop learns a boot at the tick that sees it
                self.autoscaler.observe_boot(now_s - vm.launched_s, gpu_type)
        for run_s in sim.completed_runs[self._runs_seen :]:
            self.autoscaler.observe_run(run_s)  # the loop learns each finished task's time
        self._runs_seen = len(sim.completed_runs)
        queued, free = len(sim.queue), sim.free_slots()
        snapshot = Snapshot(
            queue_depth=queued,
            oldest_queued_age_s=now_s - sim.queue[0].arrival_s if sim.queue else 0.0,
            free_slots=free,
            instances=tuple(
                InstanceSnapshot(
                    name=vm.name,
                    status=InstanceStatus.RUNNING,  # a booting GCE VM is RUNNING already
                    gpu_type=gpu_type,
                    spot=self.autoscaler.policy.launch_request.spot,
                    price_per_hour_nanousd=self._price,
                    created_at_s=vm.launched_s,
                    running_since_s=vm.connected_s,  # as the loop: the agent's connection
                    connected=vm.connected,
                    running_tasks=vm.running,
                    idle_since_s=vm.idle_since_s,
                    agent_last_seen_s=now_s if vm.connected else None,
                )
                for vm in live
            ),
            demands=[Demand(GpuRequirement(), queued, min(free, queued))] if queued else [],
        )
        decision = self.autoscaler.decide(snapshot, now_s)
        return sum(launch.count for launch in decision.launches), decision.terminated_names


class AlwaysOn:
    """``max_instances`` VMs from time 0 until the last task ends."""

    def control(self, sim: Simulation, now_s: float) -> tuple[int, Sequence[str]]:
        """Launch the whole fleet once; stop it when the trace is done."""
        if not sim.vms:
            return sim.config.max_instances, ()
        if sim.all_done:
            return 0, [vm.name for vm in sim.live_vms()]
        return 0, ()


class Autostop:
    """Launch for queued work that no free or booting slot covers; stop VMs idle ``idle_s``."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s

    def control(self, sim: Simulation, now_s: float) -> tuple[int, Sequence[str]]:
        """Scale up to the queue, stop the idle."""
        slots = sim.config.slots
        live = sim.live_vms()
        booting = sum(vm.connected_s is None for vm in live)
        excess = len(sim.queue) - sim.free_slots() - booting * slots
        room = sim.config.max_instances - len(live)
        launches = min(max(math.ceil(excess / slots), 0), room)
        stops = [
            vm.name
            for vm in live
            if vm.connected
            and vm.running == 0
            and vm.idle_since_s is not None
            and now_s - vm.idle_since_s >= self.idle_s
        ]
        return launches, stops


class Oracle:
    """Knows every arrival and run time; a heuristic bound, not a proven optimum.

    ``lead_s`` is the longest boot. At each tick it sizes the fleet for the work queued or
    arriving within ``lead_s`` (never below the VMs running tasks): one VM per ``slots``
    tasks, but no more VMs than that work keeps busy for a boot plus the billing minimum per
    slot (at least one while there is work), within ``max_instances``. Launching a boot ahead
    of need, its VMs are mostly connected when the work arrives. It stops an idle VM at once
    unless the fleet sized the same way for the work arriving within ``lead_s`` + the billing
    minimum still needs it:
    a gap longer than that costs more idle than a fresh boot and minimum would.
    """

    def __init__(self, lead_s: float) -> None:
        self.lead_s = lead_s
        self._next = 0  # index of the first task not yet arrived

    def control(self, sim: Simulation, now_s: float) -> tuple[int, Sequence[str]]:
        """Size the fleet for the known future."""
        tasks = sim.trace.tasks
        while self._next < len(tasks) and tasks[self._next].arrival_s <= now_s:
            self._next += 1
        live = sim.live_vms()
        busy = [vm for vm in live if vm.running]
        need = max(self._fleet(sim, now_s, self.lead_s), len(busy))
        launches = min(max(need - len(live), 0), sim.config.max_instances - len(live))
        keep = max(self._fleet(sim, now_s, self.lead_s + sim.config.billing_minimum_s), len(busy))
        idle = [vm for vm in live if vm.connected and vm.running == 0]
        surplus = max(len(live) - keep, 0)
        return launches, [vm.name for vm in idle[:surplus]]

    def _fleet(self, sim: Simulation, now_s: float, window_s: float) -> int:
        upcoming: list[SimTask] = []
        for task in sim.trace.tasks[self._next :]:
            if task.arrival_s > now_s + window_s:
                break
            upcoming.append(task)
        count = len(sim.queue) + len(upcoming)
        if count == 0:
            return 0
        work = sum(t.duration_s for t in (*sim.queue, *upcoming))
        slots, cap = sim.config.slots, sim.config.max_instances
        worth = math.ceil(work / (slots * (self.lead_s + sim.config.billing_minimum_s)))
        return min(max(worth, 1), math.ceil(count / slots), cap)

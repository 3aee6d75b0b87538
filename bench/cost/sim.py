"""A discrete-event simulator of GPU VMs under GCE's rules, on a simulated clock.

Rules. A launched VM boots for a uniform random time (``SimConfig.boot_range_s``, seeded)
before its agent connects and can take work. It is billed from launch to termination, at least
``billing_minimum_s`` (60 s), per second after that. GCE bills from RUNNING, a few seconds after
the insert call returns; the simulator bills from launch, so it overstates every VM by those
seconds, the same for every policy. A termination takes effect at once (no deletion delay), and
a launch appears at once (no insert latency). Each VM's agent holds ``slots`` tasks at once;
tasks start in arrival order (FIFO) on the connected VM launched earliest that has a free slot;
a task's queue wait runs from its arrival to its start.

A VM has one device, and a task's run time is what it needs of the whole device. Tasks that
share a device share it evenly (processor sharing): two at once each progress at half speed.
A GPU does not run two compute-bound tasks each at full speed, and the agent bills tasks that
overlap on one device their share of it (issue 17, item 4), so a slot adds no compute, only a
task ready to go. Billed compute is then a VM's busy time, the seconds during which it runs at
least one task, which equals the summed run times of the tasks it ran.

A ``Controller`` (the real autoscaler, or a baseline in ``policies``) is asked every
``interval_s`` for launches and terminations, like the broker's scaling loop.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bench.cost.traces import SimTask, Trace

__all__ = [
    "FAST_BOOT_S",
    "SLOW_BOOT_S",
    "Controller",
    "RunResult",
    "SimConfig",
    "SimVm",
    "Simulation",
    "percentile",
]

FAST_BOOT_S = (60.0, 120.0)
"""Boot time of a VM until its agent can work, in seconds (uniform)."""
SLOW_BOOT_S = (240.0, 360.0)
"""Boot time when the first boot installs the agent and torch from the internet."""
_EPSILON_S = 1e-6  # work left below this is done (float rounding of the shares)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The fleet's rules: slots, cap, decision interval, boot times and price."""

    slots: int = 2
    max_instances: int = 4
    interval_s: float = 5.0
    boot_range_s: tuple[float, float] = FAST_BOOT_S
    billing_minimum_s: float = 60.0
    price_per_hour_usd: float = 0.28
    drain_limit_s: float = 4 * 3600.0
    """After the last arrival, every VM still alive this much later is stopped (a bound)."""


@dataclass
class SimVm:
    """One simulated VM and its accounting."""

    name: str
    launched_s: float
    boot_s: float
    connected_s: float | None = None
    ended_s: float | None = None
    running: int = 0
    idle_since_s: float | None = None
    tasks_run: int = 0
    busy_s: float = 0.0
    busy_from_s: float = 0.0
    work_left_s: list[float] = field(default_factory=list)
    """Device-seconds each running task still needs."""
    run_s: list[float] = field(default_factory=list)
    """Each running task's whole run time (same order as ``work_left_s``)."""
    shared_since_s: float = 0.0
    """When ``work_left_s`` was last brought up to date."""
    version: int = 0
    """Bumped whenever its running set changes; a finish event of an older version is stale."""

    @property
    def connected(self) -> bool:
        """Its agent has connected and the VM is not terminated."""
        return self.connected_s is not None and self.ended_s is None


class Controller(Protocol):
    """A scaling policy under simulation."""

    def control(self, sim: Simulation, now_s: float) -> tuple[int, Sequence[str]]:
        """VMs to launch now and names of VMs to terminate now."""
        ...


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one simulation of one trace under one controller cost and delivered."""

    vm_seconds: float
    """Billed VM seconds (each VM at least the minimum)."""
    busy_seconds: float
    task_seconds: float
    waits_s: tuple[float, ...]
    launches: int
    never_ran: int
    """VMs that never ran a task."""
    price_per_hour_usd: float

    @property
    def vm_cost_usd(self) -> float:
        """What the VMs cost."""
        return self.vm_seconds * self.price_per_hour_usd / 3600

    @property
    def billed_usd(self) -> float:
        """Busy GPU time at the VMs' price."""
        return self.busy_seconds * self.price_per_hour_usd / 3600


@dataclass(order=True)
class _Event:
    time_s: float
    seq: int
    kind: str = field(compare=False)
    subject: object = field(compare=False, default=None)


class Simulation:
    """One run of ``trace`` under ``controller``; ``run()`` plays it to the end."""

    def __init__(self, trace: Trace, controller: Controller, config: SimConfig, seed: int) -> None:
        self.trace = trace
        self.config = config
        self.queue: deque[SimTask] = deque()
        self.vms: list[SimVm] = []
        self.finished = 0
        self.completed_runs: list[float] = []
        """Run times of the tasks finished so far, in the order they finished."""
        self._controller = controller
        self._rng = random.Random(seed)
        self._events: list[_Event] = []
        self._seq = 0
        self._waits: list[float] = []
        last = trace.tasks[-1].arrival_s if trace.tasks else 0.0
        self._deadline_s = last + config.drain_limit_s

    @property
    def all_done(self) -> bool:
        """Every task of the trace has finished."""
        return self.finished == len(self.trace.tasks)

    def live_vms(self) -> list[SimVm]:
        """VMs not terminated, in launch order."""
        return [vm for vm in self.vms if vm.ended_s is None]

    def free_slots(self) -> int:
        """Unused slots of connected VMs."""
        return sum(self.config.slots - vm.running for vm in self.vms if vm.connected)

    def run(self) -> RunResult:
        """Plays the trace until every task is done and every VM stopped (or the drain limit)."""
        for task in self.trace.tasks:
            self._push(task.arrival_s, "arrive", task)
        self._push(0.0, "tick")
        now = 0.0
        while self._events:
            event = heapq.heappop(self._events)
            now = event.time_s
            if now > self._deadline_s:
                break
            if self._handle(event, now):
                break
        for vm in self.live_vms():
            self._end(vm, min(now, self._deadline_s))
        return self._result()

    def _handle(self, event: _Event, now: float) -> bool:
        """Carries out one event; True when the run is over."""
        if event.kind == "arrive":
            assert isinstance(event.subject, SimTask)
            self.queue.append(event.subject)
        elif event.kind == "connect":
            assert isinstance(event.subject, SimVm)
            vm = event.subject
            if vm.ended_s is not None:
                return False
            vm.connected_s = vm.idle_since_s = now
        elif event.kind == "finish":
            assert isinstance(event.subject, tuple)
            vm, version = event.subject
            if version == vm.version:
                self._finish(vm, now)
        else:
            launches, stops = self._controller.control(self, now)
            for name in stops:
                self._terminate(name, now)
            for _ in range(launches):
                self._launch(now)
            if self.all_done and not self.live_vms():
                return True
            self._push(now + self.config.interval_s, "tick")
        self._dispatch(now)
        return False

    def _dispatch(self, now: float) -> None:
        for vm in self.vms:
            if not (self.queue and vm.connected and vm.running < self.config.slots):
                continue
            self._share(vm, now)
            while self.queue and vm.running < self.config.slots:
                task = self.queue.popleft()
                self._waits.append(now - task.arrival_s)
                if vm.running == 0:
                    vm.busy_from_s, vm.idle_since_s = now, None
                vm.running += 1
                vm.tasks_run += 1
                vm.work_left_s.append(task.duration_s)
                vm.run_s.append(task.duration_s)
            self._next_finish(vm, now)

    def _share(self, vm: SimVm, now: float) -> None:
        """Brings ``vm``'s running tasks up to ``now``: each got an equal share of the device."""
        if vm.work_left_s:
            done = (now - vm.shared_since_s) / len(vm.work_left_s)
            vm.work_left_s = [left - done for left in vm.work_left_s]
        vm.shared_since_s = now

    def _next_finish(self, vm: SimVm, now: float) -> None:
        vm.version += 1
        if vm.work_left_s:
            soonest = min(vm.work_left_s) * len(vm.work_left_s)
            self._push(now + soonest, "finish", (vm, vm.version))

    def _finish(self, vm: SimVm, now: float) -> None:
        self._share(vm, now)
        running = list(zip(vm.work_left_s, vm.run_s, strict=True))
        self.completed_runs += [run for left, run in running if left <= _EPSILON_S]
        vm.work_left_s = [left for left, _ in running if left > _EPSILON_S]
        vm.run_s = [run for left, run in running if left > _EPSILON_S]
        ended = len(running) - len(vm.work_left_s)
        vm.running -= ended
        self.finished += ended
        if vm.running == 0:
            vm.busy_s += now - vm.busy_from_s
            vm.idle_since_s = now
        self._next_finish(vm, now)

    def _launch(self, now: float) -> None:
        if len(self.live_vms()) >= self.config.max_instances:
            raise RuntimeError(f"a launch over max_instances {self.config.max_instances}")
        vm = SimVm(f"vm-{len(self.vms)}", now, self._rng.uniform(*self.config.boot_range_s))
        self.vms.append(vm)
        self._push(now + vm.boot_s, "connect", vm)

    def _terminate(self, name: str, now: float) -> None:
        vm = next((v for v in self.vms if v.name == name and v.ended_s is None), None)
        if vm is None:
            raise ValueError(f"no live VM {name}")
        if vm.running:
            raise ValueError(f"{name} still runs {vm.running} tasks")
        self._end(vm, now)

    def _end(self, vm: SimVm, now: float) -> None:
        if vm.running:  # cut off by the drain limit
            vm.busy_s += now - vm.busy_from_s
            vm.running = 0
            vm.work_left_s, vm.run_s = [], []
        vm.ended_s = now

    def _push(self, time_s: float, kind: str, subject: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._events, _Event(time_s, self._seq, kind, subject))

    def _result(self) -> RunResult:
        minimum = self.config.billing_minimum_s
        vm_seconds = sum(
            max(minimum, (vm.ended_s or vm.launched_s) - vm.launched_s) for vm in self.vms
        )
        return RunResult(
            vm_seconds=vm_seconds,
            busy_seconds=sum(vm.busy_s for vm in self.vms),
            task_seconds=sum(t.duration_s for t in self.trace.tasks),
            waits_s=tuple(self._waits),
            launches=len(self.vms),
            never_ran=sum(vm.tasks_run == 0 for vm in self.vms),
            price_per_hour_usd=self.config.price_per_hour_usd,
        )


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]

"""The autoscaling policy: when to start agent machines and when to stop them.

Pure decision logic: no grpc, no asyncio, no I/O, and no clock. The caller passes a
``Snapshot`` of the queue and the instances plus the current time (seconds on any monotonic
clock, the same one the snapshot's times use) to ``Autoscaler.decide`` and carries out the
``Decision`` through a provider. The ``Autoscaler`` keeps what it learns (boot times per GPU
type, ``estimates``; the run time per task; idle gaps, ``gaps``) and when it last ordered a
scale-up.

Scale up. Capacity is the free slots of connected agents plus ``slots_per_instance`` for every
instance still booting and every launch still pending; queued tasks beyond it want
``ceil(excess / slots_per_instance)`` new instances, counted per GPU requirement when the
snapshot carries ``demands`` (``demand.plan``: booting machines serve only the requirements
their type fits, and each requirement short of slots asks for the cheapest configured types
that fit it, so one decision may hold several launches). A new instance bills its whole boot
before it serves, so that count is then cut to the instances worth starting
(``sizing.worth_starting``): each must get at least ``launch_work_boots`` boots of the queued
work, sized with the learned run time per task and the boot time of the GPU type it would
launch, after the instances already serving have done what they do while it boots. The first
instance for work nothing serves is always worth it.
``max_queue_delay_s`` trades wait for cost (``sizing``): above 0 that first instance waits until
the oldest task has waited the delay less a boot, and more start only when the serving ones
would keep the last queued task past the delay. It also launches up to ``min_instances``.
The count is then bounded by ``max_instances`` and by ``max_hourly_spend_nanousd`` (the hourly
prices of live instances, pending launches and the new ones together), and by a cooldown after
the last scale-up; a bounded or refused scale-up still carries a reason that says why.

Scale down (the idle rule). GCE bills a minimum of 60 s, then per second (docs/deploy.md,
section 7), and a new machine bills its boot (measured, smoothed) before it serves. Stopping an
idle machine early therefore saves nothing during its first 60 s; after that, keeping it through
a gap costs the gap and stopping it costs a boot when work comes back: the ski-rental problem.
``gaps.GapLearner`` records the real gaps (idle until work needed the machine) and keeps an idle
instance for the keep time that would have cost least over the recent ones; until it has
``gap_samples`` of them it keeps one boot time times ``keep_factor``, the deterministic
ski-rental answer. With ``max_queue_delay_s`` longer than a boot the broker works in batches
and keeps nothing idle. An idle instance (connected, no task running, no task queued) is
stopped once now ≥ ``max(billing_start + 60 s, idle_since + idle_grace)``, with
``idle_grace = max(min_idle_s, keep time)``, longest idle first, never going below
``min_instances``. Per-second billing means no later boundary is worth waiting for.
Independently of idleness, an instance the provider reports ``TERMINATED`` (preempted) is
deleted, and one whose agent has not been connected for ``boot_timeout_s`` (since it was
created, or since the agent was last seen) is treated as stuck and deleted.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpubroker.billing.prices import PriceCatalog, format_usd
from gpubroker.billing.vms import MINIMUM_CHARGE
from gpubroker.broker.scaling.decisions import (
    Decision,
    InstanceSnapshot,
    Launch,
    Snapshot,
    Termination,
)
from gpubroker.broker.scaling.demand import GpuChoice, Want, choices_of, plan
from gpubroker.broker.scaling.estimates import BootEstimates
from gpubroker.broker.scaling.gaps import GapLearner
from gpubroker.broker.scaling.providers.base import InstanceStatus, LaunchRequest
from gpubroker.broker.scaling.sizing import (
    Fleet,
    first_start_due,
    needed_for_delay,
    worth_starting,
)

__all__ = [
    "GCE_BILLING_MINIMUM_S",
    "Autoscaler",
    "Decision",
    "InstanceSnapshot",
    "Launch",
    "ScalingPolicy",
    "Snapshot",
    "Termination",
    "hourly_spend",
    "worst_case_price_nanousd",
]

GCE_BILLING_MINIMUM_S = MINIMUM_CHARGE.total_seconds()
"""GCE charges every started instance for at least this long, then per second (the machine
report's ``billing.vms.MINIMUM_CHARGE``: one definition for the policy and the report)."""


def _default_request() -> LaunchRequest:
    return LaunchRequest(gpu_types=("nvidia-l4",), spot=True)


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    """How the autoscaler trades waiting work against paying for idle machines."""

    launch_request: LaunchRequest = field(default_factory=_default_request)
    """What every scale-up asks the provider for (default: one Spot ``nvidia-l4``)."""
    launch_price_nanousd: int = 0
    """Hourly price assumed for each new instance; see ``worst_case_price_nanousd``."""
    choices: tuple[GpuChoice, ...] = ()
    """The configured GPU types with memory and prices, for per-requirement launches; empty:
    ``launch_request``'s types, unpriced, memory from ``billing.prices.GPU_MEMORY_BYTES``."""
    min_instances: int = 0
    """Instances kept even when idle; 0 scales to zero."""
    max_instances: int = 4
    """Most live instances, pending launches included."""
    max_hourly_spend_nanousd: int | None = None
    """Cap on the summed hourly prices of live and to-be-launched instances; None: no cap."""
    slots_per_instance: int = 2
    """Tasks one instance's agent runs at once (the agent's ``--slots``)."""
    max_queue_delay_s: float = 0.0
    """How long queued work may wait for an instance to be started for it: 0 starts one as
    soon as work is worth it; longer trades wait for cost (see ``sizing``)."""
    launch_work_boots: float = 2.0
    """A new instance must get at least this many boot times of queued work."""
    default_run_s: float = 60.0
    """Run time per task assumed before any has been observed."""
    run_smoothing: float = 0.2
    """Weight of each finished task's run time in the running average."""
    gap_samples: int = 3
    """Idle gaps observed before the fitted keep time replaces ``keep_factor`` boot times."""
    default_boot_s: float = 90.0
    """Boot time (launch to agent connected) assumed before any has been observed."""
    boot_smoothing: float = 0.3
    """Weight of each new boot observation in the exponentially weighted average."""
    billing_minimum_s: float = GCE_BILLING_MINIMUM_S
    """Billed minimum of an instance; it is never stopped sooner, since that saves nothing."""
    min_idle_s: float = 0.0
    """Shortest idle grace, whatever the gaps."""
    keep_factor: float = 1.0
    """Idle grace in boot times until enough gaps are known; 1 is the ski-rental break-even."""
    scale_up_cooldown_s: float = 10.0
    """Least time between two scale-ups."""
    boot_timeout_s: float = 600.0
    """An instance whose agent is not connected this long after creation (or after it was
    last seen) is stuck and gets deleted."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_instances <= self.max_instances:
            raise ValueError(
                f"need 0 <= min_instances <= max_instances, got {self.min_instances} "
                f"and {self.max_instances}"
            )
        if self.slots_per_instance < 1:
            raise ValueError(
                f"slots_per_instance must be at least 1, got {self.slots_per_instance}"
            )
        for name in ("boot_smoothing", "run_smoothing"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        durations = (self.default_boot_s, self.min_idle_s, self.keep_factor, self.boot_timeout_s)
        if min(*durations, self.max_queue_delay_s, self.launch_work_boots, self.gap_samples) < 0:
            raise ValueError("durations, factors and counts must not be negative")
        if self.default_run_s <= 0:
            raise ValueError(f"default_run_s must be positive, got {self.default_run_s}")


def hourly_spend(instances: Iterable[InstanceSnapshot]) -> int:
    """Summed hourly price, in nano-USD, of the instances that are not TERMINATED."""
    return sum(i.price_per_hour_nanousd for i in instances if i.status.is_live)


def worst_case_price_nanousd(catalog: PriceCatalog, request: LaunchRequest) -> int:
    """The dearest hourly price ``request`` may end up paying, for the spend cap.

    Providers fall back from Spot to on-demand and across GPU types, so this is the highest
    on-demand price among ``request.gpu_types``.

    Raises:
        UnknownPriceError: a GPU type has no price.
    """
    return max(catalog.price_for(g, spot=False).per_hour_nanousd for g in request.gpu_types)


class Autoscaler:
    """Decides scale-ups and scale-downs from snapshots; see the module docstring for the rules."""

    def __init__(self, policy: ScalingPolicy | None = None) -> None:
        self.policy = policy or ScalingPolicy()
        self.boots = BootEstimates(self.policy.default_boot_s, self.policy.boot_smoothing)
        self._run_s = self.policy.default_run_s
        self._last_scale_up_s: float | None = None
        self.gaps = GapLearner(self.policy.gap_samples)

    @property
    def boot_time_s(self) -> float:
        """Current estimate of the boot time over every GPU type."""
        return self.boots.overall_s

    @property
    def run_time_s(self) -> float:
        """Current estimate of one task's run time."""
        return self._run_s

    @property
    def idle_grace_s(self) -> float:
        """How long an idle instance is kept once its billing minimum is over."""
        policy, boot_s = self.policy, self.boots.overall_s
        if policy.max_queue_delay_s > boot_s:
            keep = 0.0  # batches: the next machine starts when waiting work is due
        else:
            keep = self.gaps.keep_s(boot_s, boot_s * policy.keep_factor)
        return max(policy.min_idle_s, keep)

    def observe_boot(self, seconds: float, gpu_type: str | None = None) -> None:
        """Folds one measured boot (launch to agent connected) of a ``gpu_type`` machine into
        the estimates."""
        self.boots.observe(seconds, gpu_type)

    def observe_run(self, seconds: float) -> None:
        """Folds one finished task's run time (device seconds) into the estimate."""
        if seconds < 0:
            raise ValueError(f"a task cannot run {seconds} s")
        weight = self.policy.run_smoothing
        self._run_s = weight * seconds + (1 - weight) * self._run_s

    def stop_time_s(self, instance: InstanceSnapshot) -> float | None:
        """Earliest time the idle rule stops ``instance``; None while it is not idle."""
        if not instance.is_idle or instance.idle_since_s is None:
            return None
        billed_from = instance.running_since_s
        if billed_from is None:
            billed_from = instance.created_at_s
        return max(
            billed_from + self.policy.billing_minimum_s, instance.idle_since_s + self.idle_grace_s
        )

    def decide(self, snapshot: Snapshot, now_s: float) -> Decision:
        """The decision for ``snapshot`` at ``now_s``; records a scale-up it orders."""
        removed = [t for i in snapshot.instances if (t := self._broken(i, now_s)) is not None]
        gone = {t.name for t in removed}
        kept = [i for i in snapshot.instances if i.name not in gone]
        self._observe_gaps(snapshot, kept, now_s)
        launches = self._scale_up(snapshot, kept, now_s)
        if any(launch.count > 0 for launch in launches):
            self._last_scale_up_s = now_s
        elif snapshot.queue_depth == 0:
            stops = self._idle_stops(snapshot, kept, now_s)
            for stop in stops:
                self.gaps.stopped(stop.name, now_s)
            removed += stops
        return Decision(launches=launches, terminations=tuple(removed))

    def _observe_gaps(
        self, snapshot: Snapshot, kept: Sequence[InstanceSnapshot], now_s: float
    ) -> None:
        idle = {i.name: i.idle_since_s for i in kept if i.is_idle and i.idle_since_s is not None}
        busy = [i.name for i in kept if i.running_tasks > 0]
        excess = max(snapshot.queue_depth - snapshot.free_slots, 0)
        wanted = math.ceil(excess / self.policy.slots_per_instance)
        self.gaps.observe(idle, busy, wanted, now_s, horizon_s=2 * self.boots.overall_s)

    def _broken(self, instance: InstanceSnapshot, now_s: float) -> Termination | None:
        if instance.status is InstanceStatus.TERMINATED:
            return Termination(
                instance.name, "the provider reports it TERMINATED (preempted?)", "terminated"
            )
        if instance.status is InstanceStatus.STOPPING or instance.connected:
            return None
        since = instance.agent_last_seen_s
        never = since is None
        waited = now_s - (instance.created_at_s if since is None else since)
        if waited <= self.policy.boot_timeout_s:
            return None
        what = "never connected" if never else "not connected"
        return Termination(
            instance.name,
            f"its agent has {what} for {waited:.0f} s, over the "
            f"{self.policy.boot_timeout_s:.0f} s boot timeout",
            "stuck",
        )

    def _scale_up(
        self, snapshot: Snapshot, kept: Sequence[InstanceSnapshot], now_s: float
    ) -> tuple[Launch, ...]:
        launches: list[Launch] = []
        cooling = self._cooldown_left_s(now_s)
        extra = (0, 0)  # instances and hourly spend granted to earlier launches of this decision
        for wanted in self._wants(snapshot, kept):
            want = self._sized(wanted, snapshot, kept)
            price = self._price_of(want.request)
            count, limits = self._bounded(want.count, snapshot, kept, price, extra)
            if count > 0 and cooling > 0:
                count = 0
                limits.append(f"in the scale-up cooldown for another {cooling:.0f} s")
            reason = "; ".join(want.reasons)
            if limits:
                reason += f"; wanted {want.count}, launching {count}: " + "; ".join(limits)
            if count or wanted.count:
                kind = "demand" if want.queued else "min_instances"
                launches.append(Launch(count, want.request, reason, kind))
            extra = (extra[0] + count, extra[1] + count * price)
        return tuple(launches)

    def _wants(self, snapshot: Snapshot, kept: Sequence[InstanceSnapshot]) -> list[Want]:
        """Instances wanted per launch request: per requirement when the snapshot has demands."""
        if snapshot.demands is None:
            wanted, reasons = self._wanted(snapshot, kept)
            request, queued = self.policy.launch_request, snapshot.queue_depth
            if reasons and reasons[-1].endswith(f"min_instances {self.policy.min_instances}"):
                queued = 0  # started for min_instances, not for work: no sizing
            return [Want(request, wanted, tuple(reasons), queued)] if wanted else []
        policy = self.policy
        serving = [i for i in kept if i.status is not InstanceStatus.STOPPING]
        booting = Counter(i.gpu_type for i in serving if not i.connected)
        booting.update(snapshot.pending_types)
        choices = policy.choices or choices_of(policy.launch_request)
        wants = plan(
            snapshot.demands, choices, booting, policy.slots_per_instance, policy.launch_request
        )
        short = policy.min_instances - len(serving) - snapshot.pending_launches
        if short > sum(w.count for w in wants):
            reason = f"{short} below min_instances {policy.min_instances}"
            wants = [Want(policy.launch_request, short, (reason,), 0)]
        return wants

    def _price_of(self, request: LaunchRequest) -> int:
        """The dearest hourly price a launch of ``request`` may pay, for the spend cap."""
        if request == self.policy.launch_request or not self.policy.choices:
            return self.policy.launch_price_nanousd
        prices = {c.gpu_type: c.worst_price_nanousd for c in self.policy.choices}
        return max(prices.get(g, 0) for g in request.gpu_types)

    def _wanted(
        self, snapshot: Snapshot, kept: Sequence[InstanceSnapshot]
    ) -> tuple[int, list[str]]:
        policy = self.policy
        serving = [i for i in kept if i.status is not InstanceStatus.STOPPING]
        booting = sum(not i.connected for i in serving) + snapshot.pending_launches
        booting_slots = booting * policy.slots_per_instance
        excess = snapshot.queue_depth - snapshot.free_slots - booting_slots
        wanted, reasons = 0, []
        if excess > 0:
            wanted = math.ceil(excess / policy.slots_per_instance)
            reasons.append(
                f"{snapshot.queue_depth} queued tasks exceed {snapshot.free_slots} free and "
                f"{booting_slots} booting slots"
            )
        short = policy.min_instances - len(serving) - snapshot.pending_launches
        if short > wanted:
            wanted = short
            reasons.append(f"{short} below min_instances {policy.min_instances}")
        return wanted, reasons

    def _sized(self, want: Want, snapshot: Snapshot, kept: Sequence[InstanceSnapshot]) -> Want:
        """``want`` cut to the instances its queued work is worth (``sizing``); instances
        wanted for ``min_instances`` alone (no queued work behind them) are left as they are."""
        policy = self.policy
        queued = want.queued
        if queued == 0 or want.count == 0:
            return want
        types = set(want.request.gpu_types)
        fits = [
            i
            for i in kept
            if i.status is not InstanceStatus.STOPPING
            and (want.request == policy.launch_request or i.gpu_type in types)
        ]
        pending = sum(g in types for g in snapshot.pending_types)
        if want.request == policy.launch_request:
            pending = snapshot.pending_launches
        launchable = [g for g in want.request.gpu_types if g not in snapshot.held_types]
        boot_s = self.boots.for_types(launchable or want.request.gpu_types)
        fleet = Fleet(
            queued=queued,
            run_s=self._run_s,
            boot_s=boot_s,
            connected=sum(i.connected for i in fits),
            booting=sum(not i.connected for i in fits) + pending,
        )
        delay = policy.max_queue_delay_s
        age = snapshot.oldest_queued_age_s
        if fleet.serving == 0 and delay > 0 and not first_start_due(age, boot_s, delay):
            why = (
                f"the oldest of {queued} queued tasks has waited {age:.0f} s; with boots of "
                f"{boot_s:.0f} s a machine starts at {delay - boot_s:.0f} s "
                f"(max_queue_delay_s {delay:.0f})"
            )
            return dataclasses.replace(want, count=0, reasons=(*want.reasons, why))
        count = worth_starting(fleet, want.count, policy.launch_work_boots)
        if delay > 0:
            count = min(count, max(needed_for_delay(fleet, delay), int(fleet.serving == 0)))
        if count == want.count:
            return want
        why = (
            f"{count} worth starting for {fleet.work_s:.0f} s of queued work "
            f"({self._run_s:.0f} s a task) with {fleet.connected} serving and "
            f"{fleet.booting} booting ({boot_s:.0f} s boots, at least "
            f"{policy.launch_work_boots:g} boots of work each)"
        )
        return dataclasses.replace(want, count=count, reasons=(*want.reasons, why))

    def _bounded(
        self,
        wanted: int,
        snapshot: Snapshot,
        kept: Sequence[InstanceSnapshot],
        price: int,
        extra: tuple[int, int] = (0, 0),
    ) -> tuple[int, list[str]]:
        policy = self.policy
        live = [i for i in kept if i.status.is_live]
        limits: list[str] = []
        room = max(policy.max_instances - len(live) - snapshot.pending_launches - extra[0], 0)
        count = min(wanted, room)
        if count < wanted:
            limits.append(f"max_instances {policy.max_instances} leaves room for {room}")
        cap = policy.max_hourly_spend_nanousd
        if cap is not None and price > 0:
            pending = snapshot.pending_launches * policy.launch_price_nanousd
            committed = hourly_spend(live) + pending + extra[1]
            affordable = max((cap - committed) // price, 0)
            if affordable < count:
                count = affordable
                limits.append(
                    f"the hourly spend cap of {_usd(cap)} allows {affordable} more at "
                    f"{_usd(price)}/h each, with {_usd(committed)}/h already committed"
                )
        return count, limits

    def _cooldown_left_s(self, now_s: float) -> float:
        if self._last_scale_up_s is None:
            return 0.0
        return self._last_scale_up_s + self.policy.scale_up_cooldown_s - now_s

    def _idle_stops(
        self, snapshot: Snapshot, kept: Sequence[InstanceSnapshot], now_s: float
    ) -> list[Termination]:
        serving = [i for i in kept if i.status is not InstanceStatus.STOPPING]
        spare = len(serving) + snapshot.pending_launches - self.policy.min_instances
        due = [i for i in serving if (t := self.stop_time_s(i)) is not None and t <= now_s]
        due.sort(key=lambda i: (i.idle_since_s, i.name))
        return [self._idle_stop(i, now_s) for i in due[: max(spare, 0)]]

    def _idle_stop(self, instance: InstanceSnapshot, now_s: float) -> Termination:
        assert instance.idle_since_s is not None
        return Termination(
            instance.name,
            f"idle for {now_s - instance.idle_since_s:.0f} s, past the "
            f"{self.idle_grace_s:.0f} s grace (fitted to {len(self.gaps.gaps)} idle gaps, "
            f"boot estimate {self.boots.overall_s:.0f} s) and the "
            f"{self.policy.billing_minimum_s:.0f} s billing minimum",
        )


def _usd(nanousd: int) -> str:
    return format_usd(nanousd, places=4)

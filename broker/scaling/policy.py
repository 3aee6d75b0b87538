"""The autoscaling policy: when to start agent machines and when to stop them.

Pure decision logic: no grpc, no asyncio, no I/O, and no clock. The caller passes a
``Snapshot`` of the queue and the instances plus the current time (seconds on any monotonic
clock, the same one the snapshot's times use) to ``Autoscaler.decide`` and carries out the
``Decision`` through a provider. The ``Autoscaler`` keeps only two pieces of state: its
estimate of the boot time and when it last ordered a scale-up.

Scale up. Capacity is the free slots of connected agents plus ``slots_per_instance`` for every
instance still booting and every launch still pending. When the queue holds more tasks than
that, it launches ``ceil(excess / slots_per_instance)`` instances, so a burst onto zero machines
starts them all at once and work arriving while they boot does not start them twice. When the
oldest queued task has waited longer than ``target_queue_wait_s`` and nothing is booting, it
launches at least one, whatever the free slots say. It also launches up to ``min_instances``.

Per requirement. When the snapshot carries ``demands`` (queued tasks per GPU requirement, with
the free slots of the connected agents that may run them), excess is counted per requirement
instead (``demand.plan``): booting machines serve only the requirements their type fits, and
each requirement short of slots launches the cheapest configured types that fit it, so one
decision may hold several launches (``Decision.launches``).
The count is then bounded by ``max_instances`` and by ``max_hourly_spend_nanousd`` (the hourly
prices of live instances, pending launches and the new ones together), and by a cooldown after
the last scale-up; a bounded or refused scale-up still carries a reason that says why.

Scale down (the idle rule). GCE bills a minimum of 60 s, then per second (docs/deploy.md,
section 7), and a new machine takes the boot time (measured, smoothed, default 90 s) before it
serves. Stopping an idle machine early therefore saves nothing during its first 60 s, and after
that saves its price per second, while stopping too early costs a cold start: a boot's worth of
billed time during which nothing runs, and that much delay for the next task. That is the
ski-rental problem, whose best deterministic online answer is to keep paying ("renting") for as
long as one cold start costs, then stop. So an idle instance (connected, no task running, no
task queued) is stopped once now ≥ ``max(billing_start + 60 s, idle_since + idle_grace)`` with
``idle_grace = max(min_idle_s, boot_time_s * keep_factor)``, longest idle first, never going
below ``min_instances``. Per-second billing means no later boundary is worth waiting for.
Independently of idleness, an instance the provider reports ``TERMINATED`` (preempted) is
deleted, and one whose agent has not been connected for ``boot_timeout_s`` (since it was
created, or since the agent was last seen) is treated as stuck and deleted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpubroker.billing.prices import PriceCatalog, format_usd
from gpubroker.billing.vms import MINIMUM_CHARGE
from gpubroker.broker.scaling.demand import Demand, GpuChoice, Want, choices_of, plan
from gpubroker.broker.scaling.providers.base import InstanceStatus, LaunchRequest

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
    target_queue_wait_s: float = 30.0
    """Launch one more instance when the oldest queued task has waited longer than this."""
    default_boot_s: float = 90.0
    """Boot time (launch to agent connected) assumed before any has been observed."""
    boot_smoothing: float = 0.3
    """Weight of each new boot observation in the exponentially weighted average."""
    billing_minimum_s: float = GCE_BILLING_MINIMUM_S
    """Billed minimum of an instance; it is never stopped sooner, since that saves nothing."""
    min_idle_s: float = 30.0
    """Shortest idle grace, whatever the boot time."""
    keep_factor: float = 1.0
    """Idle grace in boot times; 1 is the ski-rental break-even."""
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
        if not 0 < self.boot_smoothing <= 1:
            raise ValueError(f"boot_smoothing must be in (0, 1], got {self.boot_smoothing}")
        if min(self.default_boot_s, self.min_idle_s, self.keep_factor, self.boot_timeout_s) < 0:
            raise ValueError("boot, idle and timeout durations must not be negative")


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """One instance as the autoscaler sees it: provider status plus what its agent is doing."""

    name: str
    status: InstanceStatus
    gpu_type: str
    spot: bool
    price_per_hour_nanousd: int
    """Its hourly price, from the price catalog."""
    created_at_s: float
    """When the provider created it, on the caller's clock."""
    running_since_s: float | None = None
    """When it reached RUNNING (billing starts); None falls back to ``created_at_s``."""
    connected: bool = False
    """Its agent holds a control stream to the broker now."""
    running_tasks: int = 0
    """Attempts its agent runs now."""
    idle_since_s: float | None = None
    """When it last finished a task or (re)connected; None if its agent never connected."""
    agent_last_seen_s: float | None = None
    """Last time its agent was connected; None if never. Ignored while connected."""

    @property
    def is_idle(self) -> bool:
        """Connected, running, and running nothing."""
        return (
            self.status is InstanceStatus.RUNNING
            and self.connected
            and self.running_tasks == 0
            and self.idle_since_s is not None
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one decision looks at."""

    queue_depth: int = 0
    """Tasks queued and not yet assigned."""
    oldest_queued_age_s: float = 0.0
    """How long the oldest queued task has waited; 0 when the queue is empty."""
    free_slots: int = 0
    """Unused slots across connected agents."""
    instances: Sequence[InstanceSnapshot] = ()
    """Every instance the provider knows of."""
    pending_launches: int = 0
    """Launches ordered whose instance is not in ``instances`` yet."""
    demands: Sequence[Demand] | None = None
    """Queued tasks per GPU requirement; None: count ``queue_depth`` against ``free_slots``."""
    pending_types: Sequence[str] = ()
    """The first GPU type of each pending launch."""


@dataclass(frozen=True, slots=True)
class Launch:
    """Start ``count`` instances of ``request``; ``count`` is 0 when limits refused them."""

    count: int
    request: LaunchRequest
    reason: str


@dataclass(frozen=True, slots=True)
class Termination:
    """Delete the instance ``name``."""

    name: str
    reason: str
    """Why, for people."""
    kind: str = "idle"
    """Why, for code: ``idle``, ``stuck`` (its agent never or no longer connects) or
    ``terminated`` (the provider already reports it gone, e.g. preempted)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now: a ``Launch`` per launch request wanted, and any ``Termination``s."""

    launches: tuple[Launch, ...] = ()
    """Empty when no scale-up was wanted."""
    terminations: tuple[Termination, ...] = ()

    @property
    def launch(self) -> Launch | None:
        """The first launch; None when no scale-up was wanted."""
        return self.launches[0] if self.launches else None

    @property
    def terminated_names(self) -> tuple[str, ...]:
        """Names of the instances to delete."""
        return tuple(t.name for t in self.terminations)


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
        self._boot_s = self.policy.default_boot_s
        self._last_scale_up_s: float | None = None

    @property
    def boot_time_s(self) -> float:
        """Current estimate of the boot time."""
        return self._boot_s

    @property
    def idle_grace_s(self) -> float:
        """How long an idle instance is kept once its billing minimum is over."""
        return max(self.policy.min_idle_s, self._boot_s * self.policy.keep_factor)

    def observe_boot(self, seconds: float) -> None:
        """Folds one measured boot (launch to agent connected) into the estimate."""
        if seconds < 0:
            raise ValueError(f"a boot cannot take {seconds} s")
        weight = self.policy.boot_smoothing
        self._boot_s = weight * seconds + (1 - weight) * self._boot_s

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
        launches = self._scale_up(snapshot, kept, now_s)
        if any(launch.count > 0 for launch in launches):
            self._last_scale_up_s = now_s
        elif snapshot.queue_depth == 0:
            removed += self._idle_stops(snapshot, kept, now_s)
        return Decision(launches=launches, terminations=tuple(removed))

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
        for want in self._wants(snapshot, kept):
            price = self._price_of(want.request)
            count, limits = self._bounded(want.count, snapshot, kept, price, extra)
            if count > 0 and cooling > 0:
                count = 0
                limits.append(f"in the scale-up cooldown for another {cooling:.0f} s")
            reason = "; ".join(want.reasons)
            if limits:
                reason += f"; wanted {want.count}, launching {count}: " + "; ".join(limits)
            launches.append(Launch(count, want.request, reason))
            extra = (extra[0] + count, extra[1] + count * price)
        return tuple(launches)

    def _wants(self, snapshot: Snapshot, kept: Sequence[InstanceSnapshot]) -> list[Want]:
        """Instances wanted per launch request: per requirement when the snapshot has demands."""
        if snapshot.demands is None:
            wanted, reasons = self._wanted(snapshot, kept)
            return [Want(self.policy.launch_request, wanted, tuple(reasons))] if wanted else []
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
            wants = [Want(policy.launch_request, short, (reason,))]
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
        elif self._waited_too_long(snapshot) and booting == 0:
            wanted = 1
            reasons.append(
                f"the oldest queued task has waited {snapshot.oldest_queued_age_s:.0f} s, over "
                f"the {policy.target_queue_wait_s:.0f} s target, and nothing is booting"
            )
        short = policy.min_instances - len(serving) - snapshot.pending_launches
        if short > wanted:
            wanted = short
            reasons.append(f"{short} below min_instances {policy.min_instances}")
        return wanted, reasons

    def _waited_too_long(self, snapshot: Snapshot) -> bool:
        return (
            snapshot.queue_depth > 0
            and snapshot.oldest_queued_age_s > self.policy.target_queue_wait_s
        )

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
            f"{self.idle_grace_s:.0f} s grace (boot estimate {self._boot_s:.0f} s x "
            f"{self.policy.keep_factor:g}) and the {self.policy.billing_minimum_s:.0f} s "
            "billing minimum",
        )


def _usd(nanousd: int) -> str:
    return format_usd(nanousd, places=4)

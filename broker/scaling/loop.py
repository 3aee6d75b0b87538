"""The autoscaling loop: carries out the scaling policy's decisions through a provider.

Every ``interval_s`` it lists the provider's instances (ours, by label, including any a previous
broker left behind: they are adopted, and stopped like any other once idle), looks at the queue
and at each instance's agent, asks the pure ``Autoscaler`` what to do, and launches or deletes
machines in worker threads (GCE calls block for seconds to minutes). Each machine's life is
written to the billing database (``gpubroker.billing.vms``): created, running (the provider's
first RUNNING sighting, where GCE's charge starts), when its agent's process started and when
that agent first connected (where its boot ends), deleted and why, so reports can put VM cost
and boot time beside billed compute. The boot's phases (``boots.BootTimeline``) also go to the
``ScalingEvents`` (the broker's metrics).

Launches that fail (a boot that never connects, no capacity anywhere) hold further launches of
that GPU type with exponential backoff (``backoff.LaunchBackoff``) until one of its agents
connects, so a broken image or a stockout is not retried every few seconds.

Its configuration (``ScalingConfig``, read by ``load_scaling_config``) is in ``config``; this
module re-exports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from gpubroker.billing.errors import UnknownPriceError
from gpubroker.billing.prices import PriceCatalog
from gpubroker.billing.vms import (
    EndReason,
    VmLaunch,
    record_connected,
    record_created,
    record_deleted,
    record_running,
)
from gpubroker.broker.core.capacity import Capacity
from gpubroker.broker.core.placement import PlacementKey, may_run
from gpubroker.broker.core.registry import AgentRegistry
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.model import GpuRequirement, Task, TaskState
from gpubroker.broker.scaling.backoff import Hold, LaunchBackoff
from gpubroker.broker.scaling.boots import BootTimeline
from gpubroker.broker.scaling.config import (
    PROVIDERS,
    ScalingConfig,
    load_scaling_config,
    offers_of,
)
from gpubroker.broker.scaling.demand import Demand
from gpubroker.broker.scaling.events import NoEvents, ScalingEvents
from gpubroker.broker.scaling.fleet import FleetClock
from gpubroker.broker.scaling.history import recorded_boots, recorded_runs
from gpubroker.broker.scaling.policy import Autoscaler, InstanceSnapshot, Snapshot
from gpubroker.broker.scaling.providers.base import (
    CapacityError,
    Instance,
    InstanceStatus,
    LaunchRequest,
    Provider,
)
from gpubroker.broker.storage.async_store import AsyncTaskStore

__all__ = [
    "PROVIDERS",
    "ScalingConfig",
    "ScalingEvents",
    "ScalingLoop",
    "load_scaling_config",
    "offers_of",
]

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """What the loop remembers of one instance between ticks."""

    created_s: float
    created_at: datetime
    """The provider's creation time (the boot's first moment)."""
    launched: bool = False
    """Started by this loop (so its time to connect is a boot time worth learning from)."""
    running_at: datetime | None = None
    """First RUNNING sighting."""
    stuck: bool = False
    """Its stuck boot was counted (the policy repeats it every tick until it is gone)."""
    connected_s: float | None = None
    idle_since_s: float | None = None
    last_seen_s: float | None = None


class ScalingLoop:
    """Runs the autoscaler against a provider until stopped.

    ``events`` hears of boot phases, failed launches and launch holds (the broker passes its
    metrics).
    """

    def __init__(
        self,
        provider: Provider,
        config: ScalingConfig,
        store: AsyncTaskStore,
        queue: FairQueue,
        registry: AgentRegistry,
        engine: Engine,
        catalog: PriceCatalog,
        capacity: Capacity | None = None,
        *,
        events: ScalingEvents | None = None,
    ) -> None:
        self.provider = provider
        self._config = config
        self._store = store
        self._queue = queue
        self._registry = registry
        self._engine = engine
        self._catalog = catalog
        self._capacity = capacity or Capacity()
        self._capacity.configure(offers_of(config))
        self.autoscaler = Autoscaler(config.policy)
        self.backoff: LaunchBackoff[str] = LaunchBackoff(config.backoff)
        """Failures and holds per GPU type (zones are the provider's business)."""
        self._events: ScalingEvents = events or NoEvents()
        self._tracked: dict[str, _Tracked] = {}
        self._pending = 0
        self._pending_types: Counter[str] = Counter()
        self._terminating: set[str] = set()
        self._jobs: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._fleet = FleetClock(self._price)

    def stopping(self) -> frozenset[str]:
        """The machines being deleted now (for the broker's status)."""
        return frozenset(self._terminating)

    def observe_task(self, task: Task) -> None:
        """A task event: each success teaches the policy a run time (``TaskEvents`` listener)."""
        if task.state is TaskState.SUCCEEDED and task.compute_seconds is not None:
            self.autoscaler.observe_run(task.compute_seconds)

    def start(self) -> None:
        """Starts ticking."""
        self._loop_task = asyncio.create_task(self._run(), name="autoscaler")

    async def stop(self, *, release: bool) -> None:
        """Stops ticking; with ``release`` also stops every instance (local agents)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for job in list(self._jobs):
            job.cancel()
        if release:
            close = getattr(self.provider, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
            now = datetime.now(UTC)
            for name in list(self._tracked):
                await asyncio.to_thread(record_deleted, self._engine, name, now, EndReason.SHUTDOWN)

    async def learn_history(self) -> None:
        """Seeds the policy's boot and run time estimates from what earlier runs recorded, so
        a restarted broker sizes launches as the one before it did (``history``)."""
        longest = self._config.policy.boot_timeout_s
        try:
            boots, runs = await asyncio.to_thread(
                lambda: (
                    recorded_boots(self._engine, self.provider.name, longest),
                    recorded_runs(self._engine),
                )
            )
        except Exception:  # estimates are a head start, not a reason to stop scaling
            logger.exception("could not read recorded boots and run times; using the defaults")
            return
        self.autoscaler.boots.seed(boots)
        for seconds in runs:
            self.autoscaler.observe_run(seconds)
        logger.info(
            "learned from %d recorded boots (estimate %.0f s) and %d task runs (%.1f s a task)",
            len(boots), self.autoscaler.boot_time_s, len(runs), self.autoscaler.run_time_s,
        )  # fmt: skip

    async def _run(self) -> None:
        await self.learn_history()
        while True:
            try:
                await self.tick()
            except Exception:  # a provider hiccup must not end autoscaling for good
                logger.exception("autoscaler tick failed")
            await asyncio.sleep(self._config.interval_s)

    async def tick(self) -> None:
        """One round: observe, decide, act."""
        instances = await asyncio.to_thread(self.provider.list)
        now_s, wall = time.monotonic(), datetime.now(UTC)
        await self._reconcile(instances, now_s, wall)
        snapshot = Snapshot(
            queue_depth=len(self._queue),
            oldest_queued_age_s=await self._oldest_queued_age(wall),
            free_slots=sum(s.room for s in self._registry.sessions() if not s.draining),
            instances=tuple(self._snapshot(i) for i in instances),
            pending_launches=self._pending,
            demands=self._demands(),
            pending_types=tuple(self._pending_types.elements()),
            held_types=frozenset(h.key for h in self.backoff.holds() if h.remaining_s(now_s)),
        )
        decision = self.autoscaler.decide(snapshot, now_s)
        by_name = {i.name: i for i in instances}
        self._events.fleet(self._fleet.tick(instances, self._connected, now_s))
        for termination in decision.terminations:
            logger.info("stopping %s: %s", termination.name, termination.reason)
            stopped = by_name.get(termination.name)
            gpu_type = "unknown" if stopped is None else stopped.gpu_type
            self._events.decision("stop", termination.kind, gpu_type, 1)
            if termination.kind == "stuck" and termination.name in by_name:
                self._stuck(by_name[termination.name], termination.reason, now_s)
            self._spawn(self._terminate(termination.name, _END_REASONS[termination.kind]))
        for launch in decision.launches:
            request = self._admitted(launch.request, now_s) if launch.count else None
            if request is None:
                continue
            logger.info("launching %d of %s: %s", launch.count, request, launch.reason)
            self._events.decision("launch", launch.kind, request.gpu_types[0], launch.count)
            for _ in range(launch.count):
                self._pending += 1
                self._pending_types[request.gpu_types[0]] += 1
                self._spawn(self._launch(request))
        self._publish_holds(now_s)
        starting = (InstanceStatus.PROVISIONING, InstanceStatus.STAGING, InstanceStatus.RUNNING)
        booting = [
            i.gpu_type for i in snapshot.instances if i.status in starting and not i.connected
        ]
        self._capacity.set_booting([*booting, *self._pending_types.elements()])

    def _stuck(self, instance: Instance, reason: str, now_s: float) -> None:
        """Holds launches of the GPU type of a machine whose agent never connected: its image or
        startup script (which every zone shares) is the likely cause, so a relaunch would most
        likely fail too. An agent that connected and later fell silent says nothing of boots."""
        tracked = self._tracked.get(instance.name)
        if tracked is None or tracked.stuck or tracked.connected_s is not None:
            return
        tracked.stuck = True
        hold = self.backoff.fail(instance.gpu_type, now_s, f"{instance.name} stuck: {reason}")
        self._events.launch_failure("stuck", instance.gpu_type, instance.zone)
        logger.warning(
            "stuck boot of %s (%s, %s); holding %s launches for %.0f s (%d failures in a row)",
            instance.name, instance.gpu_type, instance.zone, instance.gpu_type,
            hold.remaining_s(now_s), hold.failures,
        )  # fmt: skip

    def _admitted(self, request: LaunchRequest, now_s: float) -> LaunchRequest | None:
        """``request`` without its held GPU types; None when every one is held."""
        held = [g for g in request.gpu_types if self.backoff.remaining_s(g, now_s) > 0]
        for gpu_type in held:
            hold = self.backoff.hold(gpu_type)
            if hold is not None and self.backoff.announce(gpu_type):
                logger.warning(
                    "not launching %s for another %.0f s (backoff after %d failures; last: %s)",
                    gpu_type, hold.remaining_s(now_s), hold.failures, hold.cause,
                )  # fmt: skip
        if not held:
            return request
        free = tuple(g for g in request.gpu_types if g not in held)
        return dataclasses.replace(request, gpu_types=free) if free else None

    def _publish_holds(self, now_s: float) -> None:
        holds = [(h.key, "*", h.remaining_s(now_s)) for h in self.backoff.holds()]
        zone_holds: Callable[[float], list[Hold[tuple[str, str]]]] | None = getattr(
            self.provider, "zone_holds", None
        )
        if zone_holds is not None:
            holds += [(*h.key, h.remaining_s(now_s)) for h in zone_holds(now_s)]
        self._events.launch_holds(holds)

    def _demands(self) -> list[Demand]:
        """Queued tasks per GPU requirement, with the free slots of agents that may run them.

        A class no connected agent may run has no free slots: its tasks count as demand even
        when other agents idle (the machines the autoscaler starts run every workload of the
        configured agent).
        """
        sessions = [s for s in self._registry.sessions() if not s.draining]
        totals: dict[GpuRequirement, list[int]] = {}
        for key, queued in self._queue.classes():
            if isinstance(key, PlacementKey):
                requires, rooms = key.requires, [s.room for s in sessions if may_run(s.info, key)]
            else:
                requires, rooms = GpuRequirement(), [s.room for s in sessions]
            total = totals.setdefault(requires, [0, 0])
            total[0] += queued
            total[1] += min(sum(rooms), queued)
        return [Demand(r, queued, free) for r, (queued, free) in totals.items()]

    async def _oldest_queued_age(self, wall: datetime) -> float:
        oldest = await self._store.oldest_queued()
        return 0.0 if oldest is None else max((wall - oldest).total_seconds(), 0.0)

    async def _reconcile(self, instances: list[Instance], now_s: float, wall: datetime) -> None:
        """Adopts new names, notes agents that connected, records machines that vanished."""
        listed = {i.name for i in instances}
        for instance in instances:
            tracked = self._tracked.get(instance.name)
            if tracked is None:
                age = max((wall - instance.created_at).total_seconds(), 0.0)
                tracked = _Tracked(created_s=now_s - age, created_at=instance.created_at)
                self._tracked[instance.name] = tracked
                await asyncio.to_thread(
                    record_created, self._engine, self._vm(instance), instance.created_at
                )
            if instance.status is InstanceStatus.RUNNING and tracked.running_at is None:
                # The provider bills from RUNNING (boot included), not from the agent's hello.
                tracked.running_at = wall
                await asyncio.to_thread(record_running, self._engine, instance.name, wall)
            booting = tracked.connected_s is None
            self._observe_agent(instance, tracked, now_s)
            if booting and tracked.connected_s is not None:  # its boot ends here
                await self._booted(instance, tracked, wall)
        for name in set(self._tracked) - listed - self._terminating:  # gone without us
            del self._tracked[name]
            await asyncio.to_thread(record_deleted, self._engine, name, wall, EndReason.PREEMPTED)

    async def _booted(self, instance: Instance, tracked: _Tracked, wall: datetime) -> None:
        """Records a machine's first connection and, for one this loop launched, its phases."""
        session = self._registry.get(instance.name)
        info = session.info if session is not None else None
        connected = wall if info is None or info.connected_at is None else info.connected_at
        started = None if info is None else info.started_at
        await asyncio.to_thread(record_connected, self._engine, instance.name, connected, started)
        if not tracked.launched:  # an adopted machine's boot is history, not news
            return
        timeline = BootTimeline(tracked.created_at, tracked.running_at, started, connected)
        for phase, seconds in timeline.phases().items():
            self._events.boot_phase(phase.value, instance.gpu_type, seconds)
        if self.backoff.succeed(instance.gpu_type):
            logger.info("an agent of %s connected: launch backoff reset", instance.gpu_type)

    def _observe_agent(self, instance: Instance, tracked: _Tracked, now_s: float) -> None:
        session = self._registry.get(instance.name)
        if session is None:
            tracked.idle_since_s = None
            return
        tracked.last_seen_s = now_s
        if tracked.connected_s is None:
            tracked.connected_s = now_s
            if tracked.launched:  # an adopted machine's age says nothing about boot times
                self.autoscaler.observe_boot(now_s - tracked.created_s, instance.gpu_type)
        if session.leases:
            tracked.idle_since_s = None
        elif tracked.idle_since_s is None:
            tracked.idle_since_s = now_s

    def _snapshot(self, instance: Instance) -> InstanceSnapshot:
        tracked = self._tracked[instance.name]
        session = self._registry.get(instance.name)
        return InstanceSnapshot(
            name=instance.name,
            status=instance.status,
            gpu_type=instance.gpu_type,
            spot=instance.spot,
            price_per_hour_nanousd=self._price(instance),
            created_at_s=tracked.created_s,
            running_since_s=tracked.connected_s,
            connected=session is not None and not session.draining,
            running_tasks=0 if session is None else len(session.leases),
            idle_since_s=tracked.idle_since_s,
            agent_last_seen_s=tracked.last_seen_s,
        )

    def _connected(self, name: str) -> bool:
        session = self._registry.get(name)
        return session is not None and not session.draining

    def _price(self, instance: Instance) -> int:
        try:
            return self._catalog.price_for(instance.gpu_type, spot=instance.spot).per_hour_nanousd
        except UnknownPriceError:
            return 0

    def _vm(self, instance: Instance) -> VmLaunch:
        return VmLaunch(
            name=instance.name,
            provider=self.provider.name,
            zone=instance.zone,
            gpu_type=instance.gpu_type,
            machine_type=instance.machine_type,
            spot=instance.spot,
            price_per_hour_nanousd=self._price(instance),
            price_version=self._catalog.version,
        )

    def _spawn(self, work: Any) -> None:
        job = asyncio.ensure_future(work)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _launch(self, request: LaunchRequest) -> None:
        try:
            instance = await asyncio.to_thread(self.provider.launch, request)
        except CapacityError as exc:
            self._no_capacity(request, str(exc))
            return
        except Exception as exc:
            logger.warning("launch failed: %s", exc)
            return
        finally:
            self._pending -= 1
            self._pending_types[request.gpu_types[0]] -= 1
            self._pending_types += Counter()  # drops the types that reached 0
        logger.info("launched %s (%s, %s)", instance.name, instance.gpu_type, instance.zone)
        if (tracked := self._tracked.get(instance.name)) is not None:
            tracked.launched = True  # a tick listed it while the launch call was returning
            return
        self._tracked[instance.name] = _Tracked(
            created_s=time.monotonic(), created_at=instance.created_at, launched=True
        )
        await asyncio.to_thread(
            record_created, self._engine, self._vm(instance), instance.created_at
        )

    def _no_capacity(self, request: LaunchRequest, detail: str) -> None:
        """Every zone refused every GPU type of ``request``: hold each of them."""
        now_s = time.monotonic()
        for gpu_type in request.gpu_types:
            hold = self.backoff.fail(gpu_type, now_s, detail)
            self._events.launch_failure("no_capacity", gpu_type, "*")
            logger.warning(
                "no capacity for %s anywhere; holding its launches for %.0f s: %s",
                gpu_type, hold.remaining_s(now_s), detail,
            )  # fmt: skip

    async def _terminate(self, name: str, reason: EndReason) -> None:
        if name in self._terminating:
            return  # still stopping from an earlier tick
        self._terminating.add(name)
        try:
            await asyncio.to_thread(self.provider.terminate, name)
        except Exception as exc:
            logger.warning("could not stop %s: %s", name, exc)
            return
        finally:
            self._terminating.discard(name)
        self._tracked.pop(name, None)
        await asyncio.to_thread(record_deleted, self._engine, name, datetime.now(UTC), reason)


_END_REASONS = {
    "idle": EndReason.IDLE,
    "stuck": EndReason.STUCK,
    "terminated": EndReason.PREEMPTED,
}
"""What a termination's kind is recorded as in the billing database."""

"""The autoscaling loop: carries out the scaling policy's decisions through a provider.

Every ``interval_s`` it lists the provider's instances (ours, by label, including any a previous
broker left behind: they are adopted, and stopped like any other once idle), looks at the queue
and at each instance's agent, asks the pure ``Autoscaler`` what to do, and launches or deletes
machines in worker threads (GCE calls block for seconds to minutes). Each machine's life is
written to the billing database (``gpubroker.billing.vms``): created, running (the provider's
first RUNNING sighting, where GCE's charge starts), its agent's first connection (where its boot
ends), deleted and why, so reports can put VM cost and boot time beside billed compute.

The configuration is one TOML file (``--scaling-config``), with a table per concern: ``[policy]``
(``ScalingPolicy``), ``[local]`` (``LocalSettings``) or ``[gce]`` (``GceSettings``). See
``docs/deploy.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from gpubroker.billing.errors import UnknownPriceError
from gpubroker.billing.prices import GPU_MEMORY_BYTES, PriceCatalog, to_nanousd
from gpubroker.billing.vms import (
    EndReason,
    VmLaunch,
    record_connected,
    record_created,
    record_deleted,
    record_running,
)
from gpubroker.broker.core.capacity import Capacity, GpuOffer
from gpubroker.broker.core.placement import PlacementKey, may_run
from gpubroker.broker.core.registry import AgentRegistry
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.model import GpuRequirement
from gpubroker.broker.scaling.demand import Demand, GpuChoice
from gpubroker.broker.scaling.policy import (
    Autoscaler,
    InstanceSnapshot,
    ScalingPolicy,
    Snapshot,
    worst_case_price_nanousd,
)
from gpubroker.broker.scaling.providers.base import (
    Instance,
    InstanceStatus,
    LaunchRequest,
    Provider,
)
from gpubroker.broker.storage.async_store import AsyncTaskStore

__all__ = ["PROVIDERS", "ScalingConfig", "ScalingLoop", "load_scaling_config"]

logger = logging.getLogger(__name__)

PROVIDERS = ("none", "local", "gce")
"""``none``: agents join on their own; ``local``: agent processes here; ``gce``: GPU VMs."""


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """What the loop runs with: the policy, the provider's own table, and the tick."""

    policy: ScalingPolicy = field(default_factory=ScalingPolicy)
    provider_table: Mapping[str, Any] = field(default_factory=dict)
    """The ``[local]`` or ``[gce]`` table, turned into the provider's settings by the server."""
    interval_s: float = 2.0
    """Seconds between decisions."""


_COMPUTED = {"launch_request", "launch_price_nanousd", "max_hourly_spend_nanousd", "choices"}
"""ScalingPolicy fields the loader derives (from gpu_types, spot, max_hourly_spend_usd...)."""


def load_scaling_config(path: Path | None, provider: str, catalog: PriceCatalog) -> ScalingConfig:
    """Reads the TOML file (None: defaults); unknown keys are an error, not a silent typo."""
    data = tomllib.loads(path.read_text()) if path is not None else {}
    unknown = set(data) - {"policy", "local", "gce"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}; use policy, local, gce")
    table = dict(data.get("policy", {}))
    interval = float(table.pop("interval_s", 2.0))
    request = LaunchRequest(
        gpu_types=tuple(table.pop("gpu_types", ["cpu"] if provider == "local" else ["nvidia-l4"])),
        spot=bool(table.pop("spot", provider == "gce")),
        max_run_seconds=table.pop("max_run_seconds", 24 * 3600 if provider == "gce" else None),
    )
    spend = table.pop("max_hourly_spend_usd", None)
    names = {f.name for f in dataclasses.fields(ScalingPolicy)} - _COMPUTED
    if bad := set(table) - names:
        raise ValueError(f"{path}: unknown [policy] keys {sorted(bad)}")
    defaults: dict[str, Any] = {"launch_request": request}
    if provider == "local":  # a process starts in about a second, not a VM's minute and a half
        defaults |= {"default_boot_s": 3.0, "min_idle_s": 10.0, "billing_minimum_s": 0.0}
    policy = ScalingPolicy(
        **(
            defaults
            | table
            | {
                "launch_price_nanousd": worst_case_price_nanousd(catalog, request),
                "choices": _choices(catalog, request),
                "max_hourly_spend_nanousd": None if spend is None else to_nanousd(str(spend)),
            }
        )
    )
    return ScalingConfig(policy, data.get(provider, {}), interval)


def _choices(catalog: PriceCatalog, request: LaunchRequest) -> tuple[GpuChoice, ...]:
    """The configured GPU types with their memory and prices (Spot or not, as configured)."""
    return tuple(
        GpuChoice(
            g,
            GPU_MEMORY_BYTES.get(g, 0),
            catalog.price_for(g, spot=request.spot).per_hour_nanousd,
            catalog.price_for(g, spot=False).per_hour_nanousd,
        )
        for g in request.gpu_types
    )


def offers_of(config: ScalingConfig) -> list[GpuOffer]:
    """What the autoscaler can start, for the submit check (``Capacity``).

    A ``cpu`` agent is one the local provider starts on this host, so its memory is this
    host's RAM, as the agent itself reports it.
    """
    policy = config.policy
    choices = policy.choices or [GpuChoice(g) for g in policy.launch_request.gpu_types]
    return [GpuOffer(c.gpu_type, c.memory_bytes or _known_memory(c.gpu_type)) for c in choices]


def _known_memory(gpu_type: str) -> int | None:
    if gpu_type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return GPU_MEMORY_BYTES.get(gpu_type)


@dataclass
class _Tracked:
    """What the loop remembers of one instance between ticks."""

    created_s: float
    launched: bool = False
    """Started by this loop (so its time to connect is a boot time worth learning from)."""
    running_recorded: bool = False
    connected_s: float | None = None
    idle_since_s: float | None = None
    last_seen_s: float | None = None


class ScalingLoop:
    """Runs the autoscaler against a provider until stopped."""

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
        self._tracked: dict[str, _Tracked] = {}
        self._pending = 0
        self._pending_types: Counter[str] = Counter()
        self._terminating: set[str] = set()
        self._jobs: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

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

    async def _run(self) -> None:
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
        )
        decision = self.autoscaler.decide(snapshot, now_s)
        for termination in decision.terminations:
            logger.info("stopping %s: %s", termination.name, termination.reason)
            self._spawn(self._terminate(termination.name, _END_REASONS[termination.kind]))
        for launch in decision.launches:
            if launch.count:
                logger.info("launching %d of %s: %s", launch.count, launch.request, launch.reason)
            for _ in range(launch.count):
                self._pending += 1
                self._pending_types[launch.request.gpu_types[0]] += 1
                self._spawn(self._launch(launch.request))
        starting = (InstanceStatus.PROVISIONING, InstanceStatus.STAGING, InstanceStatus.RUNNING)
        booting = [
            i.gpu_type for i in snapshot.instances if i.status in starting and not i.connected
        ]
        self._capacity.set_booting([*booting, *self._pending_types.elements()])

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
                tracked = self._tracked[instance.name] = _Tracked(created_s=now_s - age)
                await asyncio.to_thread(
                    record_created, self._engine, self._vm(instance), instance.created_at
                )
            if instance.status is InstanceStatus.RUNNING and not tracked.running_recorded:
                # The provider bills from RUNNING (boot included), not from the agent's hello.
                tracked.running_recorded = True
                await asyncio.to_thread(record_running, self._engine, instance.name, wall)
            booting = tracked.connected_s is None
            self._observe_agent(instance.name, tracked, now_s)
            if booting and tracked.connected_s is not None:  # its boot ends here
                await asyncio.to_thread(record_connected, self._engine, instance.name, wall)
        for name in set(self._tracked) - listed - self._terminating:  # gone without us
            del self._tracked[name]
            await asyncio.to_thread(record_deleted, self._engine, name, wall, EndReason.PREEMPTED)

    def _observe_agent(self, name: str, tracked: _Tracked, now_s: float) -> None:
        session = self._registry.get(name)
        if session is None:
            tracked.idle_since_s = None
            return
        tracked.last_seen_s = now_s
        if tracked.connected_s is None:
            tracked.connected_s = now_s
            if tracked.launched:  # an adopted machine's age says nothing about boot times
                self.autoscaler.observe_boot(now_s - tracked.created_s)
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
        self._tracked[instance.name] = _Tracked(created_s=time.monotonic(), launched=True)
        await asyncio.to_thread(
            record_created, self._engine, self._vm(instance), instance.created_at
        )

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

"""The broker's status at a glance: queue, agents, machines, recent tasks and spend.

Pure: every function here takes what was read (the queue's ``waiting``, the agents' sessions,
the live machines, the spend figures, the recent tasks) and builds ``Status`` from it; the
reading is ``core.status_source``'s. ``GetStatus`` and the status page both show a ``Status``.

Who sees what. An operator (``access.roles``) sees everything. A tenant sees its own share:
its queue lines, its running count, its recent tasks (with the agent and machine of each
attempt, as ``GetTask`` shows them) and its billed spend; of the agents and machines only how
many there are, how many slots are free and how many machines boot, run and stop, so it can
tell "waiting for capacity" from "waiting behind others" without learning other tenants' work,
agent names or the operator's costs. Machine cost and idle overhead are the operator's only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gpubroker.billing.vms import LiveMachine
from gpubroker.broker.core.placement import PlacementKey
from gpubroker.broker.core.registry import AgentSession
from gpubroker.broker.core.scheduler import Waiting
from gpubroker.broker.model import AttemptRecord, Task

__all__ = [
    "DEFAULT_RECENT_TASKS",
    "MAX_RECENT_TASKS",
    "AgentLine",
    "MachineCounts",
    "MachineLine",
    "MachineState",
    "QueueLine",
    "Spend",
    "Status",
    "TaskLine",
    "agent_lines",
    "build_status",
    "machine_lines",
    "queue_lines",
    "recent_limit",
]

DEFAULT_RECENT_TASKS = 20
"""Recent tasks in a status when the caller names no number."""
MAX_RECENT_TASKS = 200
"""The most recent tasks a status lists."""


class MachineState:
    """A machine's state in a status (plain strings, as the wire carries them)."""

    BOOTING = "booting"
    """Started; its agent has not connected yet."""
    RUNNING = "running"
    """Its agent connected (it may have left since: the machine still runs and costs)."""
    STOPPING = "stopping"
    """The autoscaler is deleting it."""


@dataclass(frozen=True, slots=True)
class QueueLine:
    """Queued tasks of one tenant, workload and GPU requirement."""

    tenant: str
    workload: str
    gpu_type: str
    """The GPU type they require; empty for any."""
    depth: int
    oldest_wait_s: float
    """How long the longest-waiting of them has been queued (since its last requeue)."""


@dataclass(frozen=True, slots=True)
class AgentLine:
    """One connected agent."""

    agent_id: str
    gpu_type: str
    slots: int
    busy_slots: int
    free_slots: int
    prefetch_held: int
    """Tasks assigned beyond its slots, queued on the agent (prefetch)."""
    models: tuple[str, ...]
    connected_at: datetime | None
    task_ids: tuple[str, ...]
    machine_name: str
    """Its machine's name when a provider started it; else empty."""
    draining: bool
    version: str


@dataclass(frozen=True, slots=True)
class MachineLine:
    """One machine not yet deleted."""

    name: str
    state: str
    """A ``MachineState``."""
    provider: str
    gpu_type: str
    zone: str
    spot: bool
    created_at: datetime
    age_s: float
    cost_nanousd: int
    price_per_hour_nanousd: int


@dataclass(frozen=True, slots=True)
class MachineCounts:
    """How many machines are in each state."""

    booting: int = 0
    running: int = 0
    stopping: int = 0


@dataclass(frozen=True, slots=True)
class Spend:
    """Money today and this month (UTC), in nano-dollars."""

    today_nanousd: int = 0
    """Billed compute (the tenant's own, in a tenant's view)."""
    month_nanousd: int = 0
    today_tasks: int = 0
    month_tasks: int = 0
    machines_today_nanousd: int = 0
    """Machine cost; operator view only (0 otherwise)."""
    machines_month_nanousd: int = 0
    idle_today_nanousd: int = 0
    """Machine cost less billed compute; operator view only."""
    idle_month_nanousd: int = 0

    def for_tenant(self) -> Spend:
        """The figures a tenant may see: its billed compute, no machine cost."""
        return Spend(self.today_nanousd, self.month_nanousd, self.today_tasks, self.month_tasks)


@dataclass(frozen=True, slots=True)
class TaskLine:
    """A recent task and where each of its attempts ran."""

    task: Task
    attempts: tuple[AttemptRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class Status:
    """What ``GetStatus`` and the status page show."""

    generated_at: datetime
    tenant: str
    """The caller's tenant."""
    operator_view: bool
    """True: every field covers the whole broker. False: the tenant's share (module doc)."""
    queue: tuple[QueueLine, ...] = ()
    running_tasks: int = 0
    agents: tuple[AgentLine, ...] = ()
    agent_count: int = 0
    free_slots: int = 0
    machines: tuple[MachineLine, ...] = ()
    machine_counts: MachineCounts = field(default_factory=MachineCounts)
    spend: Spend = field(default_factory=Spend)
    recent_tasks: tuple[TaskLine, ...] = ()

    @property
    def queued_tasks(self) -> int:
        """Queued tasks in all of ``queue``."""
        return sum(line.depth for line in self.queue)


def recent_limit(requested: int) -> int:
    """How many recent tasks to list for a request of ``requested`` (0: the default)."""
    if requested <= 0:
        return DEFAULT_RECENT_TASKS
    return min(requested, MAX_RECENT_TASKS)


def queue_lines(
    waiting: Iterable[Waiting], now: float, tenant: str | None = None
) -> tuple[QueueLine, ...]:
    """Queue lines by tenant, workload and GPU type (of ``tenant`` only, when given), deepest
    first; ``now`` is on the queue's clock (monotonic)."""
    merged: dict[tuple[str, str, str], list[float]] = {}
    for entry in waiting:
        if tenant is not None and entry.tenant != tenant:
            continue
        workload, gpu_type = _class_names(entry.key)
        found = merged.setdefault((entry.tenant, workload, gpu_type), [0, entry.oldest_queued_at])
        found[0] += entry.depth
        found[1] = min(found[1], entry.oldest_queued_at)
    lines = [
        QueueLine(t, w, g, int(depth), max(now - oldest, 0.0))
        for (t, w, g), (depth, oldest) in merged.items()
    ]
    return tuple(sorted(lines, key=lambda line: (-line.depth, line.tenant, line.workload)))


def _class_names(key: object) -> tuple[str, str]:
    if isinstance(key, PlacementKey):
        return key.workload, key.requires.gpu_type or ""
    return str(key), ""


def agent_lines(
    sessions: Iterable[AgentSession], machine_names: Iterable[str] = ()
) -> tuple[AgentLine, ...]:
    """A line per connected agent, by id; an agent whose id is one of ``machine_names`` runs
    on that machine."""
    machines = frozenset(machine_names)
    lines = [
        AgentLine(
            agent_id=s.agent_id,
            gpu_type=s.info.gpu_type,
            slots=s.info.slots,
            busy_slots=min(s.busy, s.info.slots),
            free_slots=s.free_slots,
            prefetch_held=max(s.busy - s.info.slots, 0),
            models=tuple(sorted(s.models)),
            connected_at=s.info.connected_at,
            task_ids=tuple(sorted(s.leases)),
            machine_name=s.agent_id if s.agent_id in machines else "",
            draining=s.draining,
            version=s.info.version,
        )
        for s in sessions
    ]
    return tuple(sorted(lines, key=lambda line: line.agent_id))


def machine_lines(
    machines: Iterable[LiveMachine],
    connected: Iterable[str],
    stopping: Iterable[str],
    now: datetime,
) -> tuple[MachineLine, ...]:
    """A line per live machine: stopping when the autoscaler is deleting it, running once its
    agent connected (now, or as recorded), booting before."""
    connected_now, deleting = frozenset(connected), frozenset(stopping)
    lines = []
    for m in machines:
        if m.name in deleting:
            state = MachineState.STOPPING
        elif m.name in connected_now or m.connected_at is not None:
            state = MachineState.RUNNING
        else:
            state = MachineState.BOOTING
        age = max((now - m.created_at).total_seconds(), 0.0)
        lines.append(
            MachineLine(
                m.name,
                state,
                m.provider,
                m.gpu_type,
                m.zone,
                m.spot,
                m.created_at,
                age,
                m.cost_nanousd,
                m.price_per_hour_nanousd,
            )
        )
    return tuple(lines)


def _counts(machines: Sequence[MachineLine]) -> MachineCounts:
    states = [m.state for m in machines]
    return MachineCounts(
        booting=states.count(MachineState.BOOTING),
        running=states.count(MachineState.RUNNING),
        stopping=states.count(MachineState.STOPPING),
    )


def build_status(
    *,
    now: datetime,
    tenant: str,
    operator: bool,
    queue: Sequence[QueueLine],
    running: Mapping[str, int],
    agents: Sequence[AgentLine],
    machines: Sequence[MachineLine],
    spend: Spend,
    recent: Sequence[TaskLine],
) -> Status:
    """The status ``tenant`` may see (everything for an ``operator``; see the module doc).

    ``queue`` and ``recent`` are already the caller's (``queue_lines``' ``tenant``, the
    store's recent tasks of the tenant) or everyone's; ``running`` counts running tasks by
    tenant; ``spend`` is the tenant's billed compute, or the whole broker's with machine cost.
    """
    mine = [line for line in queue if operator or line.tenant == tenant]
    shown = [line for line in recent if operator or line.task.tenant == tenant]
    return Status(
        generated_at=now,
        tenant=tenant,
        operator_view=operator,
        queue=tuple(mine),
        running_tasks=sum(running.values()) if operator else running.get(tenant, 0),
        agents=tuple(agents) if operator else (),
        agent_count=len(agents),
        free_slots=sum(a.free_slots for a in agents if not a.draining),
        machines=tuple(machines) if operator else (),
        machine_counts=_counts(machines),
        spend=spend if operator else spend.for_tenant(),
        recent_tasks=tuple(shown),
    )

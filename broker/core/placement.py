"""Where a queued task may run, which agent it prefers, and why it still waits.

Pure decisions over the queue and the agents' sessions; no I/O, no clock of its own.

A task's placement class is its workload and its GPU requirement (``PlacementKey``): the
queue keeps one fair queue per class, so a dispatch round asks each class once per free slot
whether the agent may run it, whatever number of tasks wait in it. An agent may run a class
when it runs the workload (``model:<id>``: it runs uploaded models; an operator workload: it
advertised the name) and its GPU fits the requirement.

Model affinity: a model task prefers an agent that already holds its model (no fetch, no load).
While such a holder is connected and could run it, other agents pass the task over for at
most ``affinity_wait_s`` after it was queued; then any eligible agent takes it. The round
reports when the earliest such wait ends so the dispatcher can look again then.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gpubroker.broker.core.registry import AgentSession
from gpubroker.broker.core.scheduler import FairQueue, Head
from gpubroker.broker.model import AgentInfo, GpuRequirement, Task
from gpubroker.protos.modelfile import model_of

__all__ = [
    "PlacementKey",
    "Round",
    "affinity_hold",
    "key_for",
    "match",
    "may_run",
    "runs_workload",
    "waiting_reason",
]


@dataclass(frozen=True, slots=True)
class PlacementKey:
    """A placement class: the tasks that exactly the same agents may run."""

    workload: str
    requires: GpuRequirement

    @property
    def model_id(self) -> str | None:
        """The model the class's tasks run, or None for an operator workload."""
        return model_of(self.workload)


def key_for(task: Task) -> PlacementKey:
    """The placement class of a task."""
    return PlacementKey(task.workload, task.requires)


def runs_workload(info: AgentInfo, workload: str) -> bool:
    """True when the agent runs ``workload`` (a model workload: when it runs models)."""
    if model_of(workload) is not None:
        return info.runs_models
    return workload in info.workloads


def may_run(info: AgentInfo, key: PlacementKey) -> bool:
    """True when an agent may take tasks of class ``key``."""
    return runs_workload(info, key.workload) and key.requires.fits(
        info.gpu_type, info.gpu_memory_bytes
    )


def affinity_hold(
    head: Head,
    session: AgentSession | None,
    holders: Iterable[AgentSession],
    now: float,
    wait_s: float,
) -> float | None:
    """When the wait of ``head`` for a holder of its model ends, if it is waiting for one.

    None when ``session`` (None: any agent) may take it now: an operator workload, affinity
    off, the session holds the model, the wait is over, or no eligible holder is connected.
    """
    assert isinstance(head.key, PlacementKey)
    model_id = head.key.model_id
    if model_id is None or wait_s <= 0:
        return None
    until = head.queued_at + wait_s
    if now >= until or (session is not None and model_id in session.models):
        return None
    if any(not h.draining and not h.closed and may_run(h.info, head.key) for h in holders):
        return until
    return None


@dataclass
class Round:
    """What one dispatch round decided."""

    claims: dict[AgentSession, dict[str, str]] = field(default_factory=dict)
    """Per session, the tasks it takes (task id -> tenant), in the queue's order."""
    wake_at: float | None = None
    """When the earliest affinity wait that held a task back ends; None if none did."""
    idle: dict[AgentSession, int] = field(default_factory=dict)
    """Sessions left with free slots (and the credit for them) that the queue had nothing
    for, and how many such slots each has: ``spread.plan_recalls`` fills them."""

    def held(self, until: float) -> None:
        """Notes a task held back until ``until``."""
        self.wake_at = until if self.wake_at is None else min(self.wake_at, until)


def match(
    sessions: Iterable[AgentSession],
    queue: FairQueue,
    holders: Callable[[str], Iterable[AgentSession]],
    now: float,
    affinity_wait_s: float,
) -> Round:
    """Fills free slots from the queue, then prefetch; each pick takes the fairest task the
    agent may run. Takes the picks' credit and counts their tasks as started.

    Free slots come first, the agent with the most of them first: a task goes to an idle slot
    before any agent queues one beyond its slots. Then the credit beyond the slots (prefetch)
    goes one task at a time to the agent with the fewest tasks per slot, so that queued work
    spreads over the agents instead of piling up at the one with the most credit.
    """
    result = Round()
    sessions = list(sessions)
    taken: Counter[AgentSession] = Counter()

    def rank(session: AgentSession) -> tuple[bool, int, float, int]:
        free = max(session.free_slots - taken[session], 0)
        load = (session.busy + taken[session]) / session.info.slots
        return free > 0, free, -load, session.credits

    active = [s for s in sessions if s.credits > 0 and not s.draining]
    while active:
        session = max(active, key=rank)
        item = queue.pop(_acceptor(session, holders, now, affinity_wait_s, result))
        if item is None:
            active.remove(session)
            continue
        session.credits -= 1
        taken[session] += 1
        queue.started(item[1])
        result.claims.setdefault(session, {})[item[0]] = item[1]
        if session.credits <= 0:
            active.remove(session)
    for session in sessions:
        free = min(session.credits, session.free_slots - taken[session])
        if free > 0 and not session.draining:
            result.idle[session] = free
    return result


def _acceptor(
    session: AgentSession,
    holders: Callable[[str], Iterable[AgentSession]],
    now: float,
    wait_s: float,
    result: Round,
) -> Callable[[Head], bool]:
    def accept(head: Head) -> bool:
        key = head.key
        assert isinstance(key, PlacementKey)
        if not may_run(session.info, key):
            return False
        if key.model_id is None:
            return True
        until = affinity_hold(head, session, holders(key.model_id), now, wait_s)
        if until is not None:
            result.held(until)
            return False
        return True

    return accept


def waiting_reason(
    key: PlacementKey,
    queued_at: float,
    sessions: Iterable[AgentSession],
    holders: Iterable[AgentSession],
    booting_type: str | None,
    now: float,
    affinity_wait_s: float,
) -> str:
    """Why a queued task of class ``key`` still waits; "" when it is simply next in line.

    ``booting_type`` is a GPU type fitting the task that is booting now (None: none is).
    """
    live = [s for s in sessions if not s.draining and not s.closed]
    if not any(may_run(s.info, key) for s in live):
        if booting_type is not None:
            return f"waiting for {_article(booting_type)} {booting_type} VM to boot"
        if not any(runs_workload(s.info, key.workload) for s in live):
            if key.model_id is not None:
                return "waiting for an agent that runs uploaded models"
            return f"waiting for an agent that runs workload {key.workload!r}"
        return f"waiting for an agent with {key.requires}"
    head = Head(key, "", "", queued_at)
    if affinity_hold(head, None, holders, now, affinity_wait_s) is not None:
        return f"waiting for an agent that holds its model (up to {affinity_wait_s:g} s)"
    return ""


def _article(word: str) -> str:
    # GPU types are read letter by letter or as "en-vidia": "an nvidia-l4", "a cpu".
    return "an" if word[:1].lower() in "aeioun" else "a"

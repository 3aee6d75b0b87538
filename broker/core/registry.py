"""Connected agents: what each can take (credits), which attempts each holds (leases), and
which models each holds (for model affinity)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from gpubroker.broker.model import AgentInfo, Attempt, Task

__all__ = [
    "SILENT_HEARTBEATS",
    "AgentRegistry",
    "AgentSession",
    "Assign",
    "Close",
    "Lease",
    "Liveness",
    "Outgoing",
    "Revoke",
]

SILENT_HEARTBEATS = 1.5
"""An agent not heard from for this many heartbeat intervals has missed one: it gets no new
work until it speaks again (its leases last until ``lease_timeout_s``)."""


@dataclass(frozen=True, slots=True)
class Liveness:
    """How long agents may stay silent."""

    heartbeat_interval_s: float
    """How often agents send heartbeats."""
    lease_timeout_s: float
    """An agent silent for this long loses its tasks to the queue."""

    @property
    def silent_after_s(self) -> float:
        """Silence after which an agent has missed a heartbeat and is passed over."""
        return SILENT_HEARTBEATS * self.heartbeat_interval_s


@dataclass(frozen=True, slots=True)
class Assign:
    """Tell the agent to run this attempt."""

    task: Task


@dataclass(frozen=True, slots=True)
class Revoke:
    """Tell the agent to stop this attempt."""

    attempt: Attempt
    reason: str


@dataclass(frozen=True, slots=True)
class Close:
    """End the agent's control stream."""

    reason: str


Outgoing = Assign | Revoke | Close


@dataclass(frozen=True, slots=True)
class Lease:
    """An attempt assigned to an agent and not yet ended."""

    task: Task
    """The task as its claim returned it: a success is built on it rather than read back."""
    granted_at: float = field(default_factory=time.monotonic)
    """Monotonic time of the assignment."""

    @property
    def attempt(self) -> int:
        """The attempt number the claim gave."""
        return self.task.attempt

    @property
    def tenant(self) -> str:
        """The task's tenant, whose running count the lease holds."""
        return self.task.tenant

    @property
    def call_bound(self) -> bool:
        """The task lives as long as its call: its outputs need no fsync (``Task.call_bound``)."""
        return self.task.call_bound


@dataclass(eq=False)
class AgentSession:
    """One connected control stream. Mutable: credits, leases and liveness change over time."""

    info: AgentInfo
    outbox: asyncio.Queue[Outgoing] = field(default_factory=asyncio.Queue)
    credits: int = 0
    leases: dict[str, Lease] = field(default_factory=dict)
    """task_id -> lease, for every attempt assigned and not yet ended."""
    revoked: set[Attempt] = field(default_factory=set)
    """Cancelled attempts the agent has not yet released; they still occupy a slot."""
    last_seen: float = field(default_factory=time.monotonic)
    closed: bool = False
    draining: bool = False
    """The agent said it is going away: it gets no more work."""
    granted: bool = False
    """The agent has granted credit at least once (it does right after its hello)."""
    models: frozenset[str] = frozenset()
    """Models the agent holds now: its hello's list, then each heartbeat's (``set_models``)."""

    def __post_init__(self) -> None:
        if not self.models:
            self.models = self.info.models

    @property
    def room(self) -> int:
        """Tasks the agent can take: its credits, or its slots until it has first granted
        them. Counting only credits, an agent in the moment between its hello and its first
        grant looked full, and the autoscaler launched a second machine for a task the first
        was about to take."""
        return self.credits if self.granted else self.info.slots

    @property
    def busy(self) -> int:
        """Attempts on the agent as the broker sees them: leased, or revoked and not released."""
        return len(self.leases) + len(self.revoked)

    @property
    def free_slots(self) -> int:
        """Slots with no attempt on them; whatever credit the agent has beyond is prefetch."""
        return max(self.info.slots - self.busy, 0)

    @property
    def agent_id(self) -> str:
        """The agent's id."""
        return self.info.agent_id

    def holds(self, attempt: Attempt) -> bool:
        """True while the attempt is leased to this session."""
        lease = self.leases.get(attempt.task_id)
        return lease is not None and lease.attempt == attempt.number

    def forgotten(self, reported: set[Attempt], older_than: float) -> list[Attempt]:
        """Leased attempts granted before ``older_than`` that the agent no longer reports."""
        return [
            Attempt(task_id, lease.attempt)
            for task_id, lease in self.leases.items()
            if lease.granted_at < older_than and Attempt(task_id, lease.attempt) not in reported
        ]

    def touch(self) -> None:
        """Records a sign of life."""
        self.last_seen = time.monotonic()

    def is_heard_since(self, since: float) -> bool:
        """True when the agent spoke at or after the monotonic time ``since``."""
        return self.last_seen >= since


class AgentRegistry:
    """The sessions of connected agents, by agent id."""

    def __init__(self) -> None:
        self._sessions: dict[str, AgentSession] = {}
        self._holders: dict[str, set[AgentSession]] = {}
        """model id -> the live sessions holding it."""

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: AgentSession) -> AgentSession | None:
        """Registers a session; returns the session it replaces (same agent id), if any."""
        previous = self._sessions.get(session.agent_id)
        self._sessions[session.agent_id] = session
        if previous is not None:
            self._index(previous, ())
        self._index(session, session.models)
        return previous

    def remove(self, session: AgentSession) -> bool:
        """Unregisters a session unless a newer one for the same agent took its place."""
        session.closed = True
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]
            self._index(session, ())
            return True
        return False

    def set_models(self, session: AgentSession, models: Iterable[str]) -> bool:
        """Records the models a live session holds now; True when the set changed."""
        held = frozenset(models)
        if held == session.models:
            return False
        if self._sessions.get(session.agent_id) is session:
            self._index(session, held)
        session.models = held
        return True

    def holders(self, model_id: str) -> frozenset[AgentSession]:
        """The live sessions that hold ``model_id``."""
        return frozenset(self._holders.get(model_id, ()))

    def _index(self, session: AgentSession, models: Iterable[str]) -> None:
        for model_id in session.models:
            holders = self._holders.get(model_id)
            if holders is not None:
                holders.discard(session)
                if not holders:
                    del self._holders[model_id]
        for model_id in models:
            self._holders.setdefault(model_id, set()).add(session)

    def get(self, agent_id: str) -> AgentSession | None:
        """The live session of an agent."""
        return self._sessions.get(agent_id)

    def with_credit(self, heard_since: float | None = None) -> list[AgentSession]:
        """The sessions that can take work now: credit left, not draining, and (when
        ``heard_since`` is given) heard from at or after that monotonic time; a frozen agent's
        open stream and credit alone do not make it able to run anything."""
        return [
            s
            for s in self._sessions.values()
            if s.credits > 0
            and not s.draining
            and (heard_since is None or s.is_heard_since(heard_since))
        ]

    def silent_since(self, deadline: float) -> list[AgentSession]:
        """Sessions not heard from since the monotonic time ``deadline``."""
        return [s for s in self._sessions.values() if s.last_seen < deadline]

    def sessions(self) -> list[AgentSession]:
        """Every live session."""
        return list(self._sessions.values())

"""Taking prefetched work back for agents that sit idle: work spreads over the agents.

An agent takes tasks beyond its slots (prefetch, see ``AgentHello.prefetch``) so that a freed
slot never waits for a round trip to the broker. ``placement.match`` fills free slots before
any prefetch, so while work is queued no slot idles. But an agent that connects (or whose slot
frees) after the queue emptied into another agent's prefetch would idle while that agent holds
a backlog: the first agent up in a burst took every task. So when a dispatch round leaves an
agent with free slots and nothing queued that it may run, the broker recalls prefetched tasks
from the agents holding the most per slot: it revokes them (``TaskCancel``) and requeues them
(``Cause.RECALLED``: not the task's fault, never counted against its attempts), and the idle
slots take them in the next round.

Which of an agent's tasks have not started, the broker cannot see: it takes the newest
assignments beyond the agent's slots, the ones the agent starts last (an agent runs its
assignments in the order they came). The agent never reports an attempt that was revoked, and
the broker refuses a result for one, so a guess that was wrong (the task had started) costs the
compute spent on it, never a lost or doubled result.

Model tasks are never recalled: an agent batching a model runs more tasks at once than it has
slots, so none of them is known to wait, and a model task prefers the agent that holds its
model anyway (``placement``). Pure decisions; the dispatcher carries them out.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from gpubroker.broker.core.placement import key_for, may_run
from gpubroker.broker.core.registry import AgentSession
from gpubroker.broker.model import Attempt

__all__ = ["Recall", "plan_recalls", "spare_attempts"]


@dataclass(frozen=True, slots=True)
class Recall:
    """A prefetched attempt to take back from ``donor`` so that ``taker``'s idle slot runs it."""

    donor: AgentSession
    attempt: Attempt
    taker: AgentSession


def spare_attempts(session: AgentSession, busy: Container[str] = ()) -> list[Attempt]:
    """The attempts the agent holds beyond its slots, newest first: those it has not started
    (as far as the broker can tell). Model tasks and tasks in ``busy`` (a commit in flight,
    say) are left out."""
    surplus = session.busy - session.info.slots
    if surplus <= 0 or session.draining or session.closed:
        return []
    newest = list(session.leases.items())[::-1][:surplus]  # leases keep the assignment order
    return [
        Attempt(task_id, lease.attempt)
        for task_id, lease in newest
        if key_for(lease.task).model_id is None and task_id not in busy
    ]


def plan_recalls(
    idle: Mapping[AgentSession, int],
    sessions: Iterable[AgentSession],
    busy: Container[str] = (),
) -> list[Recall]:
    """The attempts to take back so that the ``idle`` agents' free slots (session -> how many)
    get work: each slot takes one attempt the agent may run from the agent holding the most
    spare attempts per slot, until no agent holds one beyond its slots."""
    spare = {s: spare_attempts(s, busy) for s in sessions}
    spare = {s: attempts for s, attempts in spare.items() if attempts}
    recalls: list[Recall] = []
    for taker, slots in sorted(idle.items(), key=lambda item: -item[1]):
        for _ in range(slots):
            donors = [
                (len(attempts) / donor.info.slots, donor)
                for donor, attempts in spare.items()
                if donor is not taker and _runnable(taker, donor, attempts) is not None
            ]
            if not donors:
                break
            donor = max(donors, key=lambda pair: pair[0])[1]
            attempt = _runnable(taker, donor, spare[donor])
            assert attempt is not None
            spare[donor].remove(attempt)
            recalls.append(Recall(donor, attempt, taker))
    return recalls


def _runnable(taker: AgentSession, donor: AgentSession, attempts: list[Attempt]) -> Attempt | None:
    """The newest of ``attempts`` (held by ``donor``) that ``taker`` may run, if any."""
    for attempt in attempts:
        if may_run(taker.info, key_for(donor.leases[attempt.task_id].task)):
            return attempt
    return None

"""Moves queued tasks to agents and attempts back to the queue when their agents are lost.

The dispatcher changes the queue, the agent registry and the leases, which the server builds
and shares with the task service, the scaling loop and the metrics. It never imports grpc: the
gateway servicer turns agent streams into calls on it, and drains each session's outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from gpubroker.broker.config import Limits
from gpubroker.broker.core.capacity import Capacity
from gpubroker.broker.core.events import TaskEvents
from gpubroker.broker.core.failpoint import crash_if_armed
from gpubroker.broker.core.outputs import in_one_chunk, spool_outputs
from gpubroker.broker.core.placement import key_for, match, waiting_reason
from gpubroker.broker.core.reconcile import InFlight
from gpubroker.broker.core.registry import (
    AgentRegistry,
    AgentSession,
    Assign,
    Close,
    Lease,
    Liveness,
    Revoke,
)
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.core.settling import Settler
from gpubroker.broker.core.spread import Recall, plan_recalls
from gpubroker.broker.core.wakeup import Wakeup
from gpubroker.broker.core.workloads import KnownWorkloads
from gpubroker.broker.errors import (
    BrokerError,
    InvalidTaskError,
    LimitExceededError,
    SpoolFullError,
    StaleAttemptError,
    UploadCutShortError,
)
from gpubroker.broker.model import (
    AgentInfo,
    Attempt,
    AttemptOutcome,
    GpuRequirement,
    Task,
    TaskState,
)
from gpubroker.broker.storage.async_store import AsyncTaskStore
from gpubroker.broker.storage.spool import Spool
from gpubroker.broker.storage.transitions import Cause, Retries
from gpubroker.logformat import task_fields
from gpubroker.protos.states import FailureCode

__all__ = ["MAX_PREFETCH", "Dispatcher"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

MAX_PREFETCH = 1024
"""An agent asking to queue more than this beyond its slots gets this much."""


def _now() -> datetime:
    return datetime.now(UTC)


class Dispatcher:
    """Matches queued tasks with agents' free slots and keeps leases honest."""

    def __init__(
        self,
        store: AsyncTaskStore,
        spool: Spool,
        events: TaskEvents,
        queue: FairQueue,
        registry: AgentRegistry,
        workloads: KnownWorkloads,
        limits: Limits,
        liveness: Liveness,
        *,
        capacity: Capacity | None = None,
        affinity_wait_s: float = 2.0,
        failpoint: str | None = None,
    ) -> None:
        self._store = store
        self._spool = spool
        self._events = events
        self._queue = queue
        self._registry = registry
        self._workloads = workloads
        self._limits = limits
        self._retries = Retries(limits.max_attempts, limits.max_lost_attempts)
        self._liveness = liveness
        self._capacity = capacity or Capacity()
        self._affinity_wait_s = affinity_wait_s
        self._failpoint = failpoint
        self._wake = Wakeup()
        self._tasks: list[asyncio.Task[None]] = []
        self._settler = Settler()
        self.in_flight = InFlight()
        """Tasks with a commit in flight here (reconciliation leaves them alone)."""

    async def start(self) -> None:
        """Loads queued work from the store and starts the dispatch and watchdog loops."""
        self._workloads.add(await self._store.known_workloads())
        queued, cancelled = await self._store.recover(_now())
        for task in queued:
            self._push(task)
        for task in cancelled:
            self._spool.release_inputs(task)
        logger.info(
            "recovered %d queued tasks; cancelled %d whose Run calls ended with the last broker",
            len(self._queue),
            len(cancelled),
        )
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self._watchdog_loop(), name="watchdog"),
        ]
        self._wake.set()

    async def stop(self) -> None:
        """Stops the loops, lets every commit's follow-up finish, closes every agent session."""
        self._wake.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._settler.wait()
        for session in self._registry.sessions():
            session.outbox.put_nowait(Close("broker shutting down"))

    # -- client side -------------------------------------------------------------------------

    def enqueue(self, task: Task) -> None:
        """Queues a freshly submitted task."""
        self._push(task)
        self._events.publish(task)
        self._wake.set()

    def check_requirement(self, requires: GpuRequirement) -> None:
        """Refuses a requirement no GPU type the broker can get fits (``Capacity.check``)."""
        self._capacity.check(requires)

    def waiting_for(self, task: Task) -> str:
        """Why a queued task still waits ("" when it is next in line or not queued)."""
        found = self._queue.where(task.id) if task.state is TaskState.QUEUED else None
        if found is None:
            return ""
        key = key_for(task)
        holders = self._registry.holders(key.model_id) if key.model_id is not None else ()
        booting = self._capacity.booting_for(key.requires)
        sessions, now = self._registry.sessions(), time.monotonic()
        return waiting_reason(key, found[1], sessions, holders, booting, now, self._affinity_wait_s)

    async def cancel(self, task_id: str, tenant: str | None) -> Task:
        """Cancels a task: drops it from the queue or revokes its running attempt."""
        return await self.settle(self._cancel(task_id, tenant), task_id)

    async def _cancel(self, task_id: str, tenant: str | None) -> Task:
        before, after = await self._store.cancel(task_id, tenant, _now())
        if before.state is not after.state:
            self._ended(before, after, "cancelled by its owner")
        return after

    # -- agent side --------------------------------------------------------------------------

    async def connect(self, info: AgentInfo) -> AgentSession:
        """Registers a newly connected agent; a previous session of the same agent is closed.

        Raises:
            InvalidTaskError: the agent names no id or offers no slot.
            AgentRefusedError: its GPU type has no price, so its work could not be billed.
        """
        if not info.agent_id:
            raise InvalidTaskError("hello must carry an agent_id")
        if info.slots < 1:
            raise InvalidTaskError(f"hello offers {info.slots} slots; at least 1 is needed")
        info = dataclasses.replace(info, prefetch=min(max(info.prefetch, 0), MAX_PREFETCH))
        self._store.check_priced(info.gpu_type)
        self._capacity.saw(info)
        session = AgentSession(info)
        previous = self._registry.add(session)
        if previous is not None:
            previous.outbox.put_nowait(Close("replaced by a new connection"))
            await self._lose_leases(previous, "agent reconnected")
        if not info.workloads <= self._workloads.names:
            await self._store.add_workloads(info.workloads, _now())
            self._workloads.add(info.workloads)
        logger.info("agent %s connected: %s, %d slots", info.agent_id, info.gpu_type, info.slots)
        return session

    async def disconnect(self, session: AgentSession, reason: str) -> None:
        """Forgets a session and gives its attempts back to the queue at once."""
        if self._registry.remove(session):
            logger.info("agent %s disconnected: %s", session.agent_id, reason)
        await self._lose_leases(session, reason)

    def grant(self, session: AgentSession, slots: int) -> None:
        """Adds credit: the agent can take ``slots`` more tasks."""
        self._heard(session)
        if session.draining:
            return
        cap = session.info.slots + session.info.prefetch
        session.credits = min(session.credits + max(slots, 0), cap)
        session.granted = True
        self._wake.set()

    async def drain(self, session: AgentSession, reason: str) -> None:
        """The agent is going away (e.g. Spot preemption): no more work, and its attempts go
        back to the queue now rather than after a lease timeout.

        The lost attempts are never billed (only a success writes a usage row), and the agent
        is told to stop them so a late result cannot race the rerun.
        """
        self._heard(session)
        session.draining = True
        session.credits = 0
        logger.warning("agent %s is draining (%s): requeueing its work", session.agent_id, reason)
        for task_id, lease in list(session.leases.items()):
            attempt = Attempt(task_id, lease.attempt)
            session.revoked.add(attempt)
            session.outbox.put_nowait(Revoke(attempt, f"agent draining: {reason}"))
        await self._lose_leases(session, f"agent draining: {reason}")

    async def heartbeat(
        self, session: AgentSession, running: set[Attempt], models: Iterable[str] | None = None
    ) -> None:
        """Notes a sign of life and the models the agent holds now (None: it did not say);
        requeues attempts the agent has stopped reporting.

        An attempt whose result upload failed is forgotten by the agent but still leased here;
        without this it would stay running forever. Attempts younger than the lease timeout are
        spared: the agent may not have seen the assignment yet.
        """
        self._heard(session)
        changed = models is not None and session.info.runs_models
        if changed and self._registry.set_models(session, models or ()):
            self._wake.set()  # a task waiting for a holder may go elsewhere now
        older = time.monotonic() - self._liveness.lease_timeout_s
        for attempt in session.forgotten(running, older):
            self._release(session.agent_id, attempt)
            await self.requeue_lost(attempt, "the agent no longer reports it")

    def released(self, session: AgentSession, attempt: Attempt) -> None:
        """The agent stopped a revoked attempt."""
        self._heard(session)
        session.revoked.discard(attempt)

    def check_lease(self, agent_id: str, attempt: Attempt) -> AgentSession:
        """Returns the session holding ``attempt``; raises ``StaleAttemptError`` otherwise."""
        session = self._registry.get(agent_id)
        if session is None or not session.holds(attempt):
            raise StaleAttemptError(
                f"agent {agent_id!r} does not hold attempt {attempt.number} of task "
                f"{attempt.task_id}"
            )
        return session

    async def leased_task(self, agent_id: str, attempt: Attempt) -> Task:
        """The task of an attempt ``agent_id`` holds; raises ``StaleAttemptError`` otherwise."""
        self.check_lease(agent_id, attempt)
        return await self._store.get(attempt.task_id)

    async def complete(
        self, outcome: AttemptOutcome, chunks: AsyncIterator[bytes | memoryview]
    ) -> Task:
        """Takes an attempt's outcome; on success spools and checks its outputs first."""
        session = self.check_lease(outcome.agent_id, outcome.attempt)
        task_id = outcome.attempt.task_id
        if outcome.error_code is not None:
            return await self.settle(self._end(outcome, None, None), task_id)
        running = session.leases[outcome.attempt.task_id].task
        try:
            durable = not running.call_bound
            inline = await spool_outputs(self._spool, self._limits, outcome, chunks, durable)
        except SpoolFullError:
            raise  # the broker's disk, not the task: it stays leased and the agent tries again
        except BrokerError as exc:
            await self.settle(self._reject_upload(outcome, exc), task_id)
            raise
        return await self.settle(self._end(outcome, inline, running), task_id)

    async def report(self, session: AgentSession, outcome: AttemptOutcome, data: bytes) -> Task:
        """Takes an outcome an agent reported on its control stream, with its outputs' bytes.

        The session, not the report, says which agent reports: no agent speaks for another.
        """
        reported = dataclasses.replace(outcome, agent_id=session.agent_id)
        return await self.complete(reported, in_one_chunk(data))

    async def _end(
        self, outcome: AttemptOutcome, inline: bytes | None, running: Task | None
    ) -> Task:
        """Records how an attempt ended (its outputs already spooled), then frees its lease.

        A workload error fails the task at once: it is never retried (``transitions``).
        """
        if outcome.error_code is not None:
            task = await self._store.fail(
                outcome.attempt, outcome.agent_id, outcome.error_code, outcome.error_message, _now()
            )
        else:
            try:
                task = await self._store.succeed(outcome, _now(), inline, running)
            except StaleAttemptError:
                self._spool.delete_outputs(outcome.attempt.task_id, outcome.attempt.number)
                raise
            crash_if_armed(self._failpoint, "after-success-commit")
        self._release(outcome.agent_id, outcome.attempt)
        self._finished(task)
        return task

    async def settle(self, work: Coroutine[Any, Any, _T], *task_ids: str) -> _T:
        """Runs ``work`` (a commit and the in-memory change that must follow it) to its end,
        even when the call that asked for it is cancelled: a peer's RPC torn down while its
        task's change commits must not leave a row that says queued and a queue that does not
        hold the task. The caller still sees its own cancellation; ``stop`` waits for the rest.
        Reconciliation leaves ``task_ids`` alone until then (``in_flight``).
        """
        self.in_flight.add(task_ids)
        return await self._settler.settle(work, lambda: self.in_flight.discard(task_ids))

    async def _reject_upload(self, outcome: AttemptOutcome, exc: BrokerError) -> None:
        """A result that cannot be stored: too large fails the task; cut short (the agent died
        mid-upload) runs it again as a lost attempt; corrupt runs it again as one of its own."""
        self._release(outcome.agent_id, outcome.attempt)
        if isinstance(exc, LimitExceededError):
            task = await self._store.fail(
                outcome.attempt, outcome.agent_id, FailureCode.RESOURCE_EXHAUSTED, str(exc), _now()
            )
            self._finished(task)
        else:
            lost = isinstance(exc, UploadCutShortError)
            cause = Cause.LOST if lost else Cause.REJECTED
            await self._requeue_now(outcome.attempt, str(exc), cause)

    # -- internals -----------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            # Every free slot is matched first; then each agent's tasks are claimed with one
            # statement, and the agents' claims share one transaction (group commit).
            now = time.monotonic()
            free = self._registry.with_credit(now - self._liveness.silent_after_s)
            round_ = match(free, self._queue, self._registry.holders, now, self._affinity_wait_s)
            if round_.wake_at is not None:
                self._wake.at(round_.wake_at, now)
            work = [self._assign(s, items) for s, items in round_.claims.items()]
            if round_.idle:  # free slots the queue had nothing for: take back prefetched work
                recalls = plan_recalls(round_.idle, self._registry.sessions(), self.in_flight)
                if recalls:
                    work.append(
                        self.settle(self._recall(recalls), *(r.attempt.task_id for r in recalls))
                    )
            if work:
                await asyncio.gather(*work)

    async def _assign(self, session: AgentSession, items: dict[str, str]) -> None:
        """Claims popped tasks (task id -> tenant) for slots already taken from ``session``."""
        with self.in_flight.working(items):
            try:
                claimed = await self._store.claim_many(list(items), session.info, _now())
            except BaseException:
                for tenant in items.values():
                    self._unclaimed(session, tenant)
                raise
            for task_id in items.keys() - {t.id for t in claimed}:  # cancelled or expired
                self._unclaimed(session, items[task_id])
            order = {task_id: i for i, task_id in enumerate(items)}  # the queue's order
            for task in sorted(claimed, key=lambda t: order[t.id]):
                await self._hand_over(session, task, items[task.id])

    async def _hand_over(self, session: AgentSession, task: Task, tenant: str) -> None:
        if session.closed or session.draining:
            self._queue.finished(tenant)
            await self.requeue_lost(Attempt(task.id, task.attempt), "agent left during assignment")
            return
        session.leases[task.id] = Lease(task)
        session.outbox.put_nowait(Assign(task))
        self._events.publish(task)
        x = task_fields(task.id, tenant, task.attempt, session.agent_id)
        logger.debug("assigned %s#%d to %s", task.id, task.attempt, session.agent_id, extra=x)

    async def _recall(self, recalls: list[Recall]) -> None:
        """Revokes prefetched attempts (all at once, so agents hear before they start them),
        then requeues their tasks; the idle slots take them in the next round."""
        taken = [r for r in recalls if not r.donor.closed and r.donor.holds(r.attempt)]
        for recall in taken:
            reason = f"recalled for idle agent {recall.taker.agent_id}"
            self.revoke(recall.donor.agent_id, recall.attempt, reason)
        for recall in taken:
            reason = f"recalled from {recall.donor.agent_id} for idle agent {recall.taker.agent_id}"
            await self._requeue_now(recall.attempt, reason, Cause.RECALLED)

    def _unclaimed(self, session: AgentSession, tenant: str) -> None:
        """Gives back the slot and the running count of a claim that did not happen."""
        self._queue.finished(tenant)
        if not (session.closed or session.draining):
            session.credits += 1
            self._wake.set()

    async def _lose_leases(self, session: AgentSession, reason: str) -> None:
        """Requeues every attempt of a lost session; settled as a whole, since the leases
        leave the session at once and the caller may be cancelled between two requeues."""
        leases, session.leases = session.leases, {}
        await self.settle(self._requeue_leases(leases, reason), *leases)

    async def _requeue_leases(self, leases: dict[str, Lease], reason: str) -> None:
        for task_id, lease in leases.items():
            self._queue.finished(lease.tenant)
            await self._requeue_now(Attempt(task_id, lease.attempt), reason, Cause.LOST)

    async def _requeue_now(self, attempt: Attempt, reason: str, cause: Cause) -> None:
        try:
            task = await self._store.requeue(attempt, self._retries, _now(), reason, cause)
        except StaleAttemptError:
            return  # already finished, cancelled or expired
        if task.state is TaskState.QUEUED:
            n, x = attempt.number, task_fields(task.id, task.tenant, attempt.number, task.agent_id)
            logger.info("requeued %s after attempt %d: %s", task.id, n, reason, extra=x)
            self.restore(task)
        else:
            self._spool.release_inputs(task)
        self._events.publish(task)

    def _push(self, task: Task) -> None:
        key, now = key_for(task), time.monotonic()
        self._queue.push(task.id, task.tenant, task.priority, task.seq, key=key, queued_at=now)

    def _heard(self, session: AgentSession) -> None:
        """Notes a sign of life; an agent that was silent (so passed over) may take work again."""
        if not session.is_heard_since(time.monotonic() - self._liveness.silent_after_s):
            self._wake.set()
        session.touch()

    # -- reconciliation's repairs (``reconcile.Repairs``) ---------------------------------------

    def restore(self, task: Task) -> None:
        """Pushes a queued task back into the queue."""
        self._push(task)
        self._wake.set()

    async def requeue_lost(self, attempt: Attempt, reason: str) -> None:
        """Requeues a running attempt as lost to infrastructure (or fails a poison task)."""
        await self.settle(self._requeue_now(attempt, reason, Cause.LOST), attempt.task_id)

    def revoke(self, agent_id: str, attempt: Attempt, reason: str) -> None:
        """Releases a lease and tells its agent to stop the attempt; nothing if not held."""
        session = self._registry.get(agent_id)
        if session is not None and session.holds(attempt):
            self._release(agent_id, attempt)
            session.revoked.add(attempt)
            session.outbox.put_nowait(Revoke(attempt, reason))

    def _release(self, agent_id: str, attempt: Attempt) -> None:
        session = self._registry.get(agent_id)
        if session is not None and session.holds(attempt):
            self._queue.finished(session.leases.pop(attempt.task_id).tenant)

    def _ended(self, before: Task, after: Task, reason: str) -> None:
        """A live task became final outside an agent's report (cancel, deadline)."""
        if before.state is TaskState.QUEUED:
            self._queue.remove(before.id)
        elif before.state is TaskState.RUNNING and before.agent_id:
            self.revoke(before.agent_id, Attempt(before.id, before.attempt), reason)
        self._finished(after)

    def _finished(self, task: Task) -> None:
        self._spool.release_inputs(task)
        self._events.publish(task)

    async def _watchdog_loop(self) -> None:
        lease_timeout_s = self._liveness.lease_timeout_s
        while True:
            await asyncio.sleep(min(1.0, lease_timeout_s / 3))
            now = time.monotonic()
            for session in self._registry.silent_since(now - lease_timeout_s):
                silence = now - session.last_seen
                logger.warning("agent %s silent for %.1fs", session.agent_id, silence)
                session.outbox.put_nowait(Close("lease expired: no heartbeat"))
                await self.disconnect(session, "lease expired")
            for before, after in await self._store.expire(_now()):
                self._ended(before, after, "deadline exceeded")

"""Work spreads over the agents: free slots are filled before any prefetch, prefetch goes to the
agent with the fewest tasks per slot, and an agent left idle takes back another's prefetched
tasks. Pure tests over real sessions and queues, then the recall over a real broker."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import grpc
import pytest

from gpubroker.broker.core.placement import PlacementKey, match
from gpubroker.broker.core.registry import AgentRegistry, AgentSession, Lease
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.core.spread import plan_recalls, spare_attempts
from gpubroker.broker.model import AgentInfo, Attempt, GpuRequirement, Task, TaskState
from gpubroker.broker.server import BrokerServer
from gpubroker.protos import agent_pb2
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import submit
from tests.support.waiting import wait_for

ECHO = PlacementKey("echo", GpuRequirement())
MODEL = "cd" * 32


def _agent(
    registry: AgentRegistry,
    agent_id: str,
    *,
    slots: int,
    credits: int,
    workloads: tuple[str, ...] = ("echo",),
) -> AgentSession:
    info = AgentInfo(agent_id, "cpu", 0, slots, frozenset(workloads), prefetch=64)
    session = AgentSession(info, credits=credits, granted=True)
    registry.add(session)
    return session


def _queue(n: int, key: PlacementKey = ECHO) -> FairQueue:
    queue = FairQueue()
    for i in range(n):
        queue.push(f"t{i}", "tenant", 0, i, key=key)
    return queue


def _lease(session: AgentSession, task_id: str, workload: str = "echo") -> None:
    task = Task(
        task_id, "tenant", workload, {}, 0, TaskState.RUNNING, 1, (), (), 0, 0, datetime.now(UTC)
    )
    session.leases[task_id] = Lease(task)


def _taken(registry: AgentRegistry, queue: FairQueue) -> dict[str, list[str]]:
    result = match(registry.sessions(), queue, registry.holders, time.monotonic(), 2.0)
    return {s.agent_id: list(items) for s, items in result.claims.items()}


# -- ordering ------------------------------------------------------------------------------


def test_every_free_slot_takes_a_task_before_any_agent_prefetches_one() -> None:
    registry = AgentRegistry()
    _agent(registry, "first", slots=2, credits=66)  # slots plus a full prefetch
    _agent(registry, "second", slots=2, credits=4)

    taken = _taken(registry, _queue(4))

    # Before: the agent with the most credit took all four, and "second" idled.
    assert {agent: len(tasks) for agent, tasks in taken.items()} == {"first": 2, "second": 2}


def test_an_agent_with_free_slots_goes_before_one_whose_slots_are_busy() -> None:
    registry = AgentRegistry()
    busy = _agent(registry, "busy", slots=2, credits=20)
    _lease(busy, "r1")
    _lease(busy, "r2")
    _agent(registry, "free", slots=1, credits=1)

    assert _taken(registry, _queue(1)) == {"free": ["t0"]}


def test_prefetch_goes_one_task_at_a_time_to_the_agent_with_the_fewest_per_slot() -> None:
    registry = AgentRegistry()
    _agent(registry, "big", slots=4, credits=40)
    _agent(registry, "small", slots=1, credits=40)

    taken = _taken(registry, _queue(15))

    # 5 to the free slots, then 10 of prefetch in proportion to the slots: 3 tasks per slot.
    assert {agent: len(tasks) for agent, tasks in taken.items()} == {"big": 12, "small": 3}


def test_a_round_reports_free_slots_the_queue_had_nothing_for() -> None:
    registry = AgentRegistry()
    full = _agent(registry, "full", slots=1, credits=5)
    idle = _agent(registry, "idle", slots=3, credits=5)
    _lease(idle, "r1")

    result = match(registry.sessions(), _queue(2), registry.holders, 0.0, 2.0)

    # "idle" took one task into one of its two free slots; one is left with nothing to do.
    assert result.idle == {idle: 1}
    assert full not in result.idle


# -- recalls -------------------------------------------------------------------------------


def test_only_the_newest_attempts_beyond_the_slots_are_spare() -> None:
    registry = AgentRegistry()
    donor = _agent(registry, "donor", slots=2, credits=0)
    for i in range(5):
        _lease(donor, f"r{i}")

    assert spare_attempts(donor) == [Attempt(f"r{i}", 1) for i in (4, 3, 2)]
    assert spare_attempts(donor, busy={"r3"}) == [Attempt("r4", 1), Attempt("r2", 1)]
    donor.revoked.add(Attempt("gone", 1))  # a revoked attempt still holds a slot
    assert spare_attempts(donor) == [Attempt(f"r{i}", 1) for i in (4, 3, 2, 1)]
    donor.draining = True
    assert spare_attempts(donor) == []


def test_an_idle_agent_takes_back_prefetched_tasks_one_per_free_slot() -> None:
    registry = AgentRegistry()
    donor = _agent(registry, "donor", slots=2, credits=0)
    for i in range(6):
        _lease(donor, f"r{i}")
    taker = _agent(registry, "taker", slots=3, credits=3)

    recalls = plan_recalls({taker: 3}, registry.sessions())

    assert [(r.donor, r.attempt.task_id, r.taker) for r in recalls] == [
        (donor, "r5", taker),
        (donor, "r4", taker),
        (donor, "r3", taker),
    ]


def test_recalls_come_from_the_agent_with_the_most_spare_tasks_per_slot() -> None:
    registry = AgentRegistry()
    deep = _agent(registry, "deep", slots=1, credits=0)
    shallow = _agent(registry, "shallow", slots=4, credits=0)
    for i in range(4):
        _lease(deep, f"d{i}")  # 3 spare on 1 slot
    for i in range(8):
        _lease(shallow, f"s{i}")  # 4 spare on 4 slots
    taker = _agent(registry, "taker", slots=4, credits=4)

    recalls = plan_recalls({taker: 4}, registry.sessions())

    # 3/1 > 4/4: "deep" gives until it is down to 1 spare per slot, then it is a tie.
    assert [r.donor.agent_id for r in recalls] == ["deep", "deep", "deep", "shallow"]


def test_model_tasks_and_tasks_the_taker_cannot_run_are_never_recalled() -> None:
    registry = AgentRegistry()
    donor = _agent(registry, "donor", slots=1, credits=0, workloads=("echo", "matmul"))
    _lease(donor, "running")
    _lease(donor, "echo")
    _lease(donor, "matmul", workload="matmul")
    _lease(donor, "model", workload=f"model:{MODEL}")
    taker = _agent(registry, "taker", slots=2, credits=2)

    recalls = plan_recalls({taker: 2}, registry.sessions())

    assert [r.attempt.task_id for r in recalls] == ["echo"]


def test_nothing_is_recalled_while_no_agent_holds_more_than_its_slots() -> None:
    registry = AgentRegistry()
    donor = _agent(registry, "donor", slots=2, credits=0)
    _lease(donor, "r0")
    _lease(donor, "r1")
    taker = _agent(registry, "taker", slots=2, credits=2)

    assert plan_recalls({taker: 2}, registry.sessions()) == []


# -- over a real broker --------------------------------------------------------------------


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {"api_keys": {"key-a": "tenant-a"}, "join_token": JOIN_TOKEN}


class _Inbox:
    """Reads an agent's control stream in the background: its assignments and cancels."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent
        self.assigned: list[agent_pb2.TaskAssignment] = []
        self.cancelled: list[agent_pb2.TaskAttempt] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.agent.call.read()
            if message is grpc.aio.EOF:
                return
            assert isinstance(message, agent_pb2.BrokerMessage)
            batch = message.batch.messages if message.WhichOneof("kind") == "batch" else [message]
            for each in batch:
                if each.WhichOneof("kind") == "assignment":
                    self.assigned.append(each.assignment)
                elif each.WhichOneof("kind") == "cancel":
                    self.cancelled.append(each.cancel.attempt)

    def close(self) -> None:
        self._reader.cancel()
        self.agent.call.cancel()


async def test_an_agent_that_connects_late_gets_the_newest_prefetched_task_and_the_revoked_attempt_is_refused(  # noqa: E501
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    first = FakeAgent(broker_channel, "first", slots=1, prefetch=3)
    await first.next()  # welcome
    first.credit(4)  # one slot and three tasks of prefetch
    a = _Inbox(first)
    task_ids = [await submit(broker_channel, bytes([i])) for i in range(4)]
    await wait_for(lambda: len(a.assigned) == 4, 10, "the first agent to take all four")

    second = FakeAgent(broker_channel, "second", slots=1)
    await second.next()
    second.credit(1)
    b = _Inbox(second)
    try:
        await wait_for(lambda: b.assigned, 10, "the late agent to get work")
        newest = a.assigned[-1]
        assert [(t.task_id, t.attempt) for t in a.cancelled] == [(newest.task_id, 1)]
        assert [(t.task_id, t.attempt) for t in b.assigned] == [(newest.task_id, 2)]

        # The first agent's result for the revoked attempt is refused; the task stays with
        # the second agent, whose result counts.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await first.put(newest, b"stale")
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        await second.put(b.assigned[0], b"fresh")
        for assignment in a.assigned[:-1]:
            await first.put(assignment, b"ok")

        tasks = [await broker_server.store.get(t) for t in task_ids]
        assert [t.state for t in tasks] == [TaskState.SUCCEEDED] * 4
        recalled = await broker_server.store.get(newest.task_id)
        assert (recalled.agent_id, recalled.attempt) == ("second", 2)
        # Recalled, not the task's fault: counted apart from its own attempts.
        assert await broker_server.store.lost_attempts(newest.task_id) == 1
        assert [t.agent_id for t in tasks].count("first") == 3
    finally:
        a.close()
        b.close()


async def test_a_revoked_attempt_the_agent_releases_frees_its_slot_for_new_work(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    first = FakeAgent(broker_channel, "first", slots=1, prefetch=3)
    await first.next()
    first.credit(3)
    a = _Inbox(first)
    for i in range(3):
        await submit(broker_channel, bytes([i]))
    await wait_for(lambda: len(a.assigned) == 3, 10, "the first agent to take all three")

    second = FakeAgent(broker_channel, "second", slots=1)
    await second.next()
    second.credit(1)
    b = _Inbox(second)
    try:
        await wait_for(lambda: a.cancelled, 10, "a recall")
        session = broker_server.registry.get("first")
        assert session is not None
        assert session.busy == 3  # two leases and one revoked attempt not yet released
        first.outbox.put_nowait(
            agent_pb2.AgentMessage(released=agent_pb2.AgentReleased(attempt=a.cancelled[0]))
        )
        await wait_for(lambda: session.busy == 2, 10, "the release")
        assert not session.revoked
    finally:
        a.close()
        b.close()

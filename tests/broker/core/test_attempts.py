"""Attempts lost with their agents are counted apart from the task's own, over a real broker.

Agents that vanish mid-task do not use up a task's ``max_attempts``; a task whose agent is lost
``max_lost_attempts`` times fails as a poison task, and says so; a workload error fails at once.
"""

from __future__ import annotations

import grpc
import pytest

from gpubroker.broker.config import Limits
from gpubroker.broker.model import TaskState
from gpubroker.broker.server import BrokerServer
from gpubroker.protos import agent_pb2
from gpubroker.protos.states import FailureCode
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import submit
from tests.support.waiting import wait_for_async

MAX_LOST = 4


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {
        "api_keys": {"key-a": "tenant-a"},
        "join_token": JOIN_TOKEN,
        "limits": Limits(max_attempts=1, max_lost_attempts=MAX_LOST),
        "reconcile_interval_s": 0,
    }


async def _take_and_die(channel: grpc.aio.Channel, agent_id: str) -> int:
    """An agent takes the next task and disconnects; the attempt it had."""
    agent = await FakeAgent.ready(channel, agent_id)
    attempt = (await agent.next()).assignment.attempt
    agent.call.cancel()
    return int(attempt)


async def test_agents_lost_mid_task_do_not_use_up_the_tasks_own_attempts(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    task_id = await submit(broker_channel, b"x")

    for n in range(MAX_LOST - 1):  # max_attempts is 1, yet the task is requeued each time
        assert await _take_and_die(broker_channel, f"lost-{n}") == n + 1
    agent = await FakeAgent.ready(broker_channel, "survivor")
    assignment = (await agent.next()).assignment
    await agent.put(assignment, b"y")

    task = await broker_server.store.get(task_id)
    assert (task.state, task.attempt) == (TaskState.SUCCEEDED, MAX_LOST)
    assert await broker_server.store.lost_attempts(task_id) == MAX_LOST - 1


async def test_a_task_that_keeps_losing_its_agent_fails_as_a_poison_task(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    task_id = await submit(broker_channel, b"x")

    for n in range(MAX_LOST):
        await _take_and_die(broker_channel, f"victim-{n}")

    async def failed() -> bool:
        return (await broker_server.store.get(task_id)).state is TaskState.FAILED

    await wait_for_async(failed, 10, "the task to fail")
    task = await broker_server.store.get(task_id)
    assert task.error_code is FailureCode.ABORTED
    assert (task.error_message or "").startswith(
        f"poison task: its agent was lost {MAX_LOST} times"
    )
    assert "control stream closed" in (task.error_message or "")


async def test_a_workload_error_fails_the_task_at_once(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    task_id = await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment
    attempt = agent_pb2.TaskAttempt(task_id=task_id, attempt=assignment.attempt)
    header = agent_pb2.ResultHeader(
        agent_id="a1", attempt=attempt, error_code="ABORTED", error_message="RuntimeError: no"
    )

    await agent.stub.PutResult(
        iter([agent_pb2.PutResultRequest(header=header)]), metadata=agent.metadata
    )

    task = await broker_server.store.get(task_id)
    assert (task.state, task.error_code, task.error_message) == (
        TaskState.FAILED,
        FailureCode.ABORTED,
        "RuntimeError: no",
    )
    assert await broker_server.store.lost_attempts(task_id) == 0

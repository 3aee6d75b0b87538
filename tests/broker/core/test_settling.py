"""A commit and the in-memory change that follows it never come apart when a call is cancelled.

An agent that dies while uploading a result has its ``PutResult`` call cancelled, and a client
that hangs up has its ``Submit`` or ``CancelTask`` cancelled. The broker may by then be writing
the change; what must follow the commit in memory (the queue push, the lease's release, the
events) must still happen, or the row says queued while no queue holds the task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gpubroker.broker.model import Attempt, AttemptOutcome, TaskSpec, TaskState
from gpubroker.broker.server import BrokerServer
from gpubroker.protos.convert import meta_from_proto
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import submit, uint8_header

RESULT = bytes(range(256)) * 1024  # 256 KiB: over the inline limit, so it goes to the spool


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {"api_keys": {"key-a": "tenant-a"}, "join_token": JOIN_TOKEN}


async def _then_cancelled(data: bytes) -> AsyncIterator[bytes]:
    """All of ``data``; then the call is cancelled at its next wait, the task's commit."""
    yield data
    task = asyncio.current_task()
    assert task is not None
    task.cancel()


async def _cut_short_then_cancelled() -> AsyncIterator[bytes]:
    """Half the declared bytes; then the call is cancelled, as when its agent dies mid-upload.

    The cancellation is requested from inside the call's own task, so it lands at the next
    point where the call waits, which is the requeue that the short upload leads to.
    """
    yield RESULT[: len(RESULT) // 2]
    task = asyncio.current_task()
    assert task is not None
    task.cancel()


async def test_a_requeue_finishes_when_the_upload_that_caused_it_is_cancelled(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    task_id = await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment
    outcome = AttemptOutcome(
        agent_id="a1",
        attempt=Attempt(task_id, assignment.attempt),
        outputs=(meta_from_proto(uint8_header(RESULT)),),
    )

    upload = asyncio.ensure_future(
        broker_server.dispatcher.complete(outcome, _cut_short_then_cancelled())
    )
    with pytest.raises(asyncio.CancelledError):
        await upload
    agent.credit()
    retry = (await agent.next()).assignment

    assert (retry.task_id, retry.attempt) == (task_id, assignment.attempt + 1)


async def test_a_submit_cancelled_while_its_task_commits_still_queues_the_task(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    data = b"inputs that must not be lost"
    spec = TaskSpec(workload="echo", inputs=(meta_from_proto(uint8_header(data)),))

    with pytest.raises(asyncio.CancelledError):
        await broker_server.tasks.submit("tenant-a", spec, _then_cancelled(data))
    assignment = (await agent.next()).assignment

    assert assignment.attempt == 1
    assert await agent.fetch(assignment) == data


async def test_a_cancel_whose_caller_hangs_up_still_revokes_the_running_attempt(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    task_id = await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment

    cancel = asyncio.ensure_future(broker_server.tasks.cancel("tenant-a", task_id))
    await asyncio.sleep(0)  # the cancel is now waiting on its commit
    cancel.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancel
    revoked = (await agent.next()).cancel

    assert (revoked.attempt.task_id, revoked.attempt.attempt) == (task_id, assignment.attempt)
    assert (await broker_server.store.get(task_id)).state is TaskState.CANCELLED

"""A commit and the in-memory change that follows it never come apart when a call is cancelled.

An agent that dies while uploading a result has its ``PutResult`` call cancelled. The broker
may by then be writing the task's requeue; the requeue's queue push (and a success's release
and events) must still happen, or the row says queued while no queue holds the task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gpubroker.broker.model import Attempt, AttemptOutcome
from gpubroker.broker.server import BrokerServer
from gpubroker.protos.convert import meta_from_proto
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import submit, uint8_header

RESULT = bytes(range(256)) * 1024  # 256 KiB: over the inline limit, so it goes to the spool


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {"api_keys": {"key-a": "tenant-a"}, "join_token": JOIN_TOKEN}


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

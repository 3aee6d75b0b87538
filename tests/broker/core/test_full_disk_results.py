"""A result the broker's full disk cannot take is not the task's fault: the attempt stays
leased, the agent is told when to offer it again, and the task succeeds once there is room."""

from __future__ import annotations

import grpc
import pytest

from gpubroker.broker.model import Attempt, TaskState
from gpubroker.broker.server import BrokerServer
from gpubroker.broker.storage.spool import DiskFloor
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.transport import RETRY_AFTER_HEADER, RETRY_AFTER_S
from gpubroker.protos.wire import INLINE_MAX_BYTES
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import AUTH, submit

FULL = DiskFloor(min_free_bytes=1 << 62)
"""A floor above any machine's free space: the spool's disk counts as full."""


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {"api_keys": {"key-a": "tenant-a"}, "join_token": JOIN_TOKEN}


async def test_a_result_refused_for_a_full_disk_keeps_its_attempt_until_there_is_room(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    task_id = await submit(broker_channel, b"x")
    agent = await FakeAgent.ready(broker_channel, "a1")
    assignment = (await agent.next()).assignment
    big = b"y" * (INLINE_MAX_BYTES + 1)  # too large for the row: needs a spool file
    broker_server.spool.disk_floor = FULL

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await agent.put(assignment, big)

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "spool disk" in str(refused.value.details())
    trailing = dict(refused.value.trailing_metadata() or ())
    assert float(trailing[RETRY_AFTER_HEADER]) == RETRY_AFTER_S
    running = await broker_server.store.get(task_id)
    assert (running.state, running.attempt) == (TaskState.RUNNING, 1)
    assert broker_server.dispatcher.check_lease("a1", Attempt(task_id, 1))  # still leased
    assert [f for f in broker_server.spool.files() if f.attempt is not None] == []

    broker_server.spool.disk_floor = DiskFloor(0, 0.0)
    state = await agent.put(assignment, big)

    assert state == task_pb2.TASK_STATE_SUCCEEDED
    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    request = broker_pb2.GetResultRequest(task_id=task_id)
    replies = [r async for r in stub.GetResult(request, metadata=AUTH)]
    assert b"".join(r.chunk.data for r in replies if r.HasField("chunk")) == big
    done = await broker_server.store.get(task_id)
    assert (done.state, done.attempt) == (TaskState.SUCCEEDED, 1)

"""Results past their retention: GetResult answers NOT_FOUND saying the result expired and
when; a spool disk below its floor refuses large uploads with RESOURCE_EXHAUSTED."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest

from gpubroker.broker.model import AgentInfo, Attempt, AttemptOutcome, TaskSpec
from gpubroker.broker.server import BrokerServer
from gpubroker.broker.storage.spool import INLINE_MAX_BYTES, DiskFloor
from gpubroker.protos import broker_pb2, broker_pb2_grpc
from gpubroker.protos.wire import TensorMeta
from tests.support.rpc import submit

AGENT = AgentInfo("agent-1", "nvidia-l4", 1 << 30, 2, frozenset({"echo"}))


async def _succeeded_task(server: BrokerServer, finished: datetime) -> str:
    """A submitted task of tenant ``default`` that succeeded at ``finished`` (no agent ran)."""
    meta = TensorMeta("uint8", (4,), 4, 1)
    spec = TaskSpec(workload="echo", inputs=(meta,), params={})
    task, _ = await server.store.create("t-expiring", "default", spec, finished, None, b"abcd")
    (claimed,) = await server.store.claim_many([task.id], AGENT, finished)
    outcome = AttemptOutcome(
        AGENT.agent_id,
        Attempt(task.id, claimed.attempt),
        outputs=(TensorMeta("uint8", (2,), 2, 0),),
    )
    await server.store.succeed(outcome, finished, b"ok")
    return task.id


async def test_get_result_on_an_expired_result_is_not_found_and_says_it_expired(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    finished = datetime.now(UTC) - timedelta(days=8)
    task_id = await _succeeded_task(broker_server, finished)
    assert broker_server.keeper is not None
    report = await broker_server.keeper.sweep()
    stub = broker_pb2_grpc.BrokerStub(broker_channel)

    call = stub.GetResult(broker_pb2.GetResultRequest(task_id=task_id))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in call:
            pass

    assert report.expired >= 1
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"the result of task {task_id} expired at" in str(failed.value.details())
    assert "kept for 7 days" in str(failed.value.details())


async def test_a_result_within_its_retention_is_still_served(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    task_id = await _succeeded_task(broker_server, datetime.now(UTC) - timedelta(days=6))
    assert broker_server.keeper is not None
    await broker_server.keeper.sweep()
    stub = broker_pb2_grpc.BrokerStub(broker_channel)

    replies = [r async for r in stub.GetResult(broker_pb2.GetResultRequest(task_id=task_id))]

    assert replies[-1].chunk.data == b"ok"


# A floor above any machine's free space: the spool's disk counts as full.
FULL = {"spool_floor": DiskFloor(min_free_bytes=1 << 62)}


@pytest.mark.parametrize("broker_overrides", [FULL])
async def test_a_large_submit_on_a_full_disk_is_resource_exhausted_saying_so(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    small = await submit(broker_channel, b"tiny")  # no file: still taken

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await submit(broker_channel, b"x" * (INLINE_MAX_BYTES + 1))

    assert small
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "spool disk" in str(refused.value.details())
    assert list(broker_server.spool.files()) == []

"""The broker in-process with a hand-written agent speaking the raw AgentGateway protocol.

Covers the protocol details the real agent relies on (credits, fencing, revocation) without
torch or subprocesses: a fake agent on real gRPC, in the test's event loop.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from gpubroker.billing.budget import set_budget
from gpubroker.broker.server import BrokerServer
from gpubroker.protos import agent_pb2, agent_pb2_grpc, broker_pb2, broker_pb2_grpc, task_pb2
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import AUTH, bearer, submit, uint8_header
from tests.support.waiting import wait_for, wait_for_async

AGENT_AUTH = bearer(JOIN_TOKEN)


SETTINGS: dict[str, object] = {
    "api_keys": {"key-a": "tenant-a"},
    "join_token": JOIN_TOKEN,
    "heartbeat_interval_s": 0.2,
    "lease_timeout_s": 1.0,
}
WITH_METRICS = pytest.mark.parametrize(
    "broker_overrides", [{**SETTINGS, "metrics_address": "127.0.0.1:0"}], ids=["metrics"]
)
"""For tests that read /metrics: the metrics server takes 0.5 s to stop, so only they start it."""


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return SETTINGS


async def test_an_agent_gets_work_only_after_granting_credit(
    broker_channel: grpc.aio.Channel,
) -> None:
    agent = FakeAgent(broker_channel, "a1")
    welcome = await agent.next()
    task_id = await submit(broker_channel, b"hello")

    pending = asyncio.ensure_future(agent.call.read())
    await asyncio.sleep(0.5)  # a quiet window: no assignment may come before any credit
    assigned_before_credit = pending.done()
    agent.credit()
    message = await asyncio.wait_for(pending, 10)

    assert isinstance(message, agent_pb2.BrokerMessage)
    assert not assigned_before_credit
    assert welcome.welcome.agent_id == "a1"
    assert message.assignment.task_id == task_id
    assert message.assignment.attempt == 1


async def test_an_echo_round_trip_is_billed_with_the_reported_compute_time(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    task_id = await submit(broker_channel, b"payload")
    assignment = (await agent.next()).assignment

    data = await agent.fetch(assignment)
    state = await agent.put(assignment, data[::-1])

    assert data == b"payload"
    assert state == task_pb2.TASK_STATE_SUCCEEDED
    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    replies = [
        r async for r in stub.GetResult(broker_pb2.GetResultRequest(task_id=task_id), metadata=AUTH)
    ]
    assert replies[0].header.compute_seconds == 0.25
    assert b"".join(r.chunk.data for r in replies[1:]) == b"daolyap"


async def test_a_result_from_a_lost_attempt_is_refused(broker_channel: grpc.aio.Channel) -> None:
    first = await FakeAgent.ready(broker_channel, "first")
    await submit(broker_channel, b"x")
    stale = (await first.next()).assignment
    first.call.cancel()
    second = await FakeAgent.ready(broker_channel, "second")
    current = (await second.next()).assignment

    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await first.put(stale, b"x")

    assert current.attempt == stale.attempt + 1
    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await second.put(current, b"x") == task_pb2.TASK_STATE_SUCCEEDED


async def test_cancelling_a_running_task_revokes_it_on_the_agent(
    broker_channel: grpc.aio.Channel,
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    task_id = await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment

    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    reply = await stub.CancelTask(broker_pb2.CancelTaskRequest(task_id=task_id), metadata=AUTH)
    message = await agent.next()

    assert reply.task.state == task_pb2.TASK_STATE_CANCELLED
    assert message.cancel.attempt.task_id == task_id
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await agent.put(assignment, b"x")
    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_agent_without_the_join_token_is_refused(broker_channel: grpc.aio.Channel) -> None:
    stub = agent_pb2_grpc.AgentGatewayStub(broker_channel)
    hello = agent_pb2.AgentMessage(hello=agent_pb2.AgentHello(agent_id="x", slots=1))

    call = stub.Connect(iter([hello]))
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await call.read()

    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_client_key_cannot_call_the_agent_api(broker_channel: grpc.aio.Channel) -> None:
    stub = agent_pb2_grpc.AgentGatewayStub(broker_channel)
    request = agent_pb2.FetchInputsRequest(
        agent_id="x", attempt=agent_pb2.TaskAttempt(task_id="t", attempt=1)
    )

    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        async for _ in stub.FetchInputs(request, metadata=AUTH):
            pass

    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_agent_whose_gpu_has_no_price_is_refused(broker_channel: grpc.aio.Channel) -> None:
    stub = agent_pb2_grpc.AgentGatewayStub(broker_channel)
    hello = agent_pb2.AgentHello(agent_id="x", gpu_type="nvidia-rtx-9090", slots=1)

    call = stub.Connect(iter([agent_pb2.AgentMessage(hello=hello)]), metadata=AGENT_AUTH)
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await call.read()

    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nvidia-rtx-9090" in (excinfo.value.details() or "")


@pytest.mark.slow  # waits out the 1 s lease
async def test_an_attempt_the_agent_stops_reporting_is_requeued(
    broker_channel: grpc.aio.Channel,
) -> None:
    agent = await FakeAgent.ready(broker_channel, "forgetful")
    task_id = await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment
    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    request = broker_pb2.GetTaskRequest(task_id=task_id)

    async def requeued_after_a_heartbeat() -> bool:
        # A heartbeat that leaves the attempt out, every 0.2 s, until the 1 s lease has expired.
        agent.outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.AgentHeartbeat()))
        reply = await stub.GetTask(request, metadata=AUTH)
        return bool(reply.task.state == task_pb2.TASK_STATE_QUEUED)

    await wait_for_async(requeued_after_a_heartbeat, 10, "the lease to expire", interval=0.2)
    reply = await stub.GetTask(request, metadata=AUTH)

    assert assignment.attempt == 1
    assert reply.task.state == task_pb2.TASK_STATE_QUEUED
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await agent.put(assignment, b"x")
    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow  # heartbeats for 1.6 s, past the 1 s lease
async def test_an_attempt_the_agent_keeps_reporting_is_never_rescued(
    broker_channel: grpc.aio.Channel,
) -> None:
    agent = await FakeAgent.ready(broker_channel, "steady")
    task_id = await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment
    running = agent_pb2.AgentHeartbeat(
        running=[agent_pb2.TaskAttempt(task_id=task_id, attempt=assignment.attempt)]
    )

    for _ in range(8):  # 1.6 s of heartbeats listing the attempt: well past the 1 s lease
        agent.outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=running))
        await asyncio.sleep(0.2)

    assert await agent.put(assignment, b"x") == task_pb2.TASK_STATE_SUCCEEDED


async def test_small_payloads_ride_in_the_row_and_the_assignment(
    broker_channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    await submit(broker_channel, b"small")

    assignment = (await agent.next()).assignment
    state = await agent.put(assignment, b"tiny result")

    assert assignment.inputs_inline and assignment.inline_inputs == b"small"
    assert state == task_pb2.TASK_STATE_SUCCEEDED
    assert not any((tmp_path / "spool").rglob("*.bin"))


async def test_large_payloads_are_spooled_files_fetched_separately(
    broker_channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    data = bytes(range(256)) * 1024  # 256 KiB
    task_id = await submit(broker_channel, data)

    assignment = (await agent.next()).assignment
    spooled = (tmp_path / "spool" / "in" / f"{task_id}.bin").exists()
    fetched = await agent.fetch(assignment)
    await agent.put(assignment, fetched)

    assert not assignment.inputs_inline and spooled
    assert fetched == data
    assert (tmp_path / "spool" / "out" / f"{task_id}.1.bin").read_bytes() == data
    assert not (tmp_path / "spool" / "in" / f"{task_id}.bin").exists()


@WITH_METRICS
async def test_a_runs_large_inputs_are_held_in_memory_and_its_result_kept_unfsynced(
    broker_channel: grpc.aio.Channel,
    broker_server: BrokerServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fsynced: list[int] = []
    monkeypatch.setattr("gpubroker.broker.storage.spool.os.fsync", fsynced.append)
    agent = await FakeAgent.ready(broker_channel, "a1")
    data = bytes(range(256)) * 1024  # 256 KiB: too large for the row
    header = broker_pb2.TaskHeader(workload="echo", inputs=[uint8_header(data)])
    requests = [
        broker_pb2.RunRequest(header=header),
        broker_pb2.RunRequest(chunk=task_pb2.DataChunk(data=data[:100_000])),
        broker_pb2.RunRequest(chunk=task_pb2.DataChunk(data=data[100_000:])),
    ]
    call = broker_pb2_grpc.BrokerStub(broker_channel).Run(iter(requests), metadata=AUTH)

    assignment = (await agent.next()).assignment
    held = broker_server.spool.held_bytes
    url = f"http://127.0.0.1:{broker_server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    fetched = await agent.fetch(assignment)
    await agent.put(assignment, fetched[::-1])
    replies = [r async for r in call]

    task_id = assignment.task_id
    assert held == len(data) and fetched == data
    assert f"gpubroker_payload_memory_bytes {float(len(data))}" in text
    assert not (tmp_path / "spool" / "in" / f"{task_id}.bin").exists()  # never a file
    assert broker_server.spool.held_bytes == 0  # let go once the task ended
    result = b"".join(r.chunk.data for r in replies if r.WhichOneof("kind") == "chunk")
    assert result == data[::-1]
    output = tmp_path / "spool" / "out" / f"{task_id}.1.bin"
    await wait_for(lambda: not output.exists(), 10, "the delivered result to be deleted")
    assert fsynced == []  # a Run's payloads are not flushed: the task ends with its call


async def test_a_lost_result_file_is_data_loss_not_a_short_stream(
    broker_channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    data = bytes(range(256)) * 1024
    task_id = await submit(broker_channel, data)
    assignment = (await agent.next()).assignment
    await agent.put(assignment, await agent.fetch(assignment))
    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    request = broker_pb2.GetResultRequest(task_id=task_id)
    output = tmp_path / "spool" / "out" / f"{task_id}.1.bin"

    output.write_bytes(data[:1000])  # what an OS crash can leave of an unflushed file
    with pytest.raises(grpc.aio.AioRpcError) as short:
        [r async for r in stub.GetResult(request, metadata=AUTH)]
    output.unlink()
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        [r async for r in stub.GetResult(request, metadata=AUTH)]

    for error in (short.value, gone.value):
        assert error.code() == grpc.StatusCode.DATA_LOSS
        assert "is lost" in (error.details() or "")


@WITH_METRICS
async def test_metrics_count_tasks_and_show_live_state(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment
    await agent.put(assignment, b"result")
    await submit(broker_channel, b"queued")

    url = f"http://127.0.0.1:{broker_server.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())

    assert 'gpubroker_tasks_submitted_total{tenant="tenant-a",workload="echo"} 2.0' in text
    finished = 'gpubroker_tasks_finished_total{state="succeeded",tenant="tenant-a",workload="echo"}'
    assert f"{finished} 1.0" in text
    assert "gpubroker_queue_depth 1.0" in text
    assert "gpubroker_agents_connected 1.0" in text
    assert 'gpubroker_payload_bytes_total{direction="out"} 6.0' in text


async def test_a_tenant_over_budget_is_refused_and_sees_its_spend(
    broker_channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    await submit(broker_channel, b"x")
    await agent.put((await agent.next()).assignment, b"y")  # 0.25 s at $0.05/h = 3,472 nano-USD
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'broker.db'}")
    with engine.begin() as conn:
        set_budget(conn, "tenant-a", 3_000, datetime.now(UTC))
    engine.dispose()
    stub = broker_pb2_grpc.BrokerStub(broker_channel)

    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await submit(broker_channel, b"more")
    usage = await stub.GetUsage(broker_pb2.GetUsageRequest(), metadata=AUTH)

    assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "monthly budget of $0.000003000" in (excinfo.value.details() or "")
    assert (usage.month_to_date_nanousd, usage.monthly_budget_nanousd) == (3_472, 3_000)
    assert usage.has_budget and usage.tasks == 1


async def test_a_corrupt_result_upload_is_refused_and_the_task_runs_again(
    broker_channel: grpc.aio.Channel,
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    task_id = await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment
    attempt = agent_pb2.TaskAttempt(task_id=task_id, attempt=assignment.attempt)
    bad = uint8_header(b"result")
    bad.crc32c ^= 1
    messages = [
        agent_pb2.PutResultRequest(
            header=agent_pb2.ResultHeader(agent_id="a1", attempt=attempt, outputs=[bad])
        ),
        agent_pb2.PutResultRequest(chunk=task_pb2.DataChunk(data=b"result")),
    ]

    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await agent.stub.PutResult(iter(messages), metadata=AGENT_AUTH)
    agent.credit()
    retry = (await agent.next()).assignment

    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "crc32c" in (excinfo.value.details() or "")
    assert (retry.task_id, retry.attempt) == (task_id, 2)
    assert await agent.put(retry, b"result") == task_pb2.TASK_STATE_SUCCEEDED


@pytest.mark.parametrize("seconds", [math.inf, math.nan])
async def test_a_result_whose_compute_time_cannot_be_billed_is_refused(
    broker_channel: grpc.aio.Channel, seconds: float
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment

    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await agent.put(assignment, b"x", compute_seconds=seconds)
    state = await agent.put(assignment, b"x")  # the same attempt, honestly reported

    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "compute time" in (excinfo.value.details() or "")
    assert state == task_pb2.TASK_STATE_SUCCEEDED


async def test_a_just_connected_agent_counts_its_slots_as_room_until_it_grants_credit(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    agent = FakeAgent(broker_channel, "a1", slots=2)
    await agent.next()  # welcomed: the session exists, no credit granted yet
    (session,) = broker_server.registry.sessions()
    before_grant = (session.credits, session.room)

    agent.credit(1)  # an agent may grant less than its slots; from now on credit counts
    await wait_for(lambda: session.granted, 10, "the grant")
    after_grant = (session.credits, session.room)
    await submit(broker_channel, b"x")
    await agent.next()  # the task took the credit

    assert before_grant == (0, 2)  # the autoscaler must not see it as full
    assert after_grant == (1, 1)
    assert (session.credits, session.room) == (0, 0)

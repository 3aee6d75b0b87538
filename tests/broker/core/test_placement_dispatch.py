"""Placement over a real broker: fake agents of different GPU types, workloads and models on
real gRPC, tasks submitted through the client API (or queued straight into the dispatcher for
model tasks, whose upload is not this test's concern)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import grpc
import pytest

from gpubroker.billing.models import models
from gpubroker.broker.model import GpuRequirement, Task, TaskSpec
from gpubroker.broker.server import BrokerServer
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.convert import meta_from_proto
from gpubroker.protos.ids import time_ordered_id
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import AUTH, submit, submit_requests, uint8_header
from tests.support.waiting import wait_for

GIB = 1 << 30
MODEL = "cd" * 32
AFFINITY_WAIT_S = 0.5


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {
        "api_keys": {"key-a": "tenant-a"},
        "join_token": JOIN_TOKEN,
        # Fake agents send no heartbeats of their own: one interval outlasts every test here,
        # so none is passed over as silent (test_liveness covers that).
        "heartbeat_interval_s": 2.0,
        "lease_timeout_s": 5.0,
        "model_affinity_wait_s": AFFINITY_WAIT_S,
    }


async def _submit(
    channel: grpc.aio.Channel, requires: task_pb2.GpuRequirement, workload: str = "echo"
) -> str:
    data = b"x"
    header = broker_pb2.TaskHeader(
        workload=workload, inputs=[uint8_header(data)], requires=requires
    )
    stub = broker_pb2_grpc.BrokerStub(channel)
    reply = await stub.Submit(iter(submit_requests(header, [data])), metadata=AUTH)
    return str(reply.task_id)


async def _task_info(channel: grpc.aio.Channel, task_id: str) -> task_pb2.TaskInfo:
    stub = broker_pb2_grpc.BrokerStub(channel)
    reply = await stub.GetTask(broker_pb2.GetTaskRequest(task_id=task_id), metadata=AUTH)
    return reply.task


async def _queue_model_task(server: BrokerServer) -> Task:
    """A queued task of model ``MODEL``, put in the store and the dispatcher directly."""
    now = datetime.now(UTC)
    with server.engine.begin() as conn:
        if conn.execute(models.select().where(models.c.model_id == MODEL)).first() is None:
            row = {"tenant": "tenant-a", "model_id": MODEL, "name": "m", "size_bytes": 1}
            conn.execute(models.insert().values(**row, metadata={}, created_at=now))
    spec = TaskSpec(workload=f"model:{MODEL}", inputs=(meta_from_proto(uint8_header(b"m")),))
    task, _ = await server.store.create(time_ordered_id(), "tenant-a", spec, now, None, b"m")
    server.dispatcher.enqueue(task)
    return task


async def test_a_task_requiring_an_l4_never_goes_to_a_cpu_agent_and_runs_when_one_connects(
    broker_channel: grpc.aio.Channel,
) -> None:
    # Given no agent seen yet (nothing known: any requirement is accepted)
    l4_task = await _submit(broker_channel, task_pb2.GpuRequirement(gpu_type="nvidia-l4"))
    echo_task = await submit(broker_channel, b"y")
    cpu = await FakeAgent.ready(broker_channel, "cpu", gpu_memory=8 * GIB)

    behind = (await cpu.next()).assignment  # the task behind it is not blocked
    info = await _task_info(broker_channel, l4_task)
    cpu.credit()
    more = asyncio.ensure_future(cpu.next())
    l4 = await FakeAgent.ready(broker_channel, "l4", gpu_type="nvidia-l4", gpu_memory=24 * GIB)
    assignment = (await l4.next()).assignment
    await asyncio.sleep(0.2)  # a quiet window: the cpu agent, with credit, must get nothing

    assert behind.task_id == echo_task
    assert info.state == task_pb2.TASK_STATE_QUEUED
    assert info.waiting_for == "waiting for an agent with nvidia-l4"
    assert assignment.task_id == l4_task
    assert not more.done()
    more.cancel()


async def test_an_impossible_requirement_is_refused_at_submit_naming_the_available_types(
    broker_channel: grpc.aio.Channel,
) -> None:
    await FakeAgent.ready(broker_channel, "cpu", gpu_memory=31 * GIB)
    await FakeAgent.ready(broker_channel, "l4", gpu_type="nvidia-l4", gpu_memory=24 * GIB)

    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await _submit(broker_channel, task_pb2.GpuRequirement(gpu_type="nvidia-h100-80gb"))
    fits = await _submit(broker_channel, task_pb2.GpuRequirement(min_memory_bytes=20 * GIB))

    assert excinfo.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert excinfo.value.details() == (
        "no GPU type matches nvidia-h100-80gb; available: cpu (31 GiB), nvidia-l4 (24 GiB)"
    )
    assert fits


async def test_a_workload_advertised_by_only_one_agent_goes_only_there(
    broker_channel: grpc.aio.Channel,
) -> None:
    plain = await FakeAgent.ready(broker_channel, "plain")
    plain.credit(3)
    special = FakeAgent(broker_channel, "special", workloads=("echo", "special"))
    await special.next()
    task_id = await _submit(broker_channel, task_pb2.GpuRequirement(), workload="special")
    quiet = asyncio.ensure_future(plain.next())
    await asyncio.sleep(0.2)
    waiting = await _task_info(broker_channel, task_id)

    special.credit()
    assignment = (await special.next()).assignment

    assert waiting.waiting_for == ""  # an agent runs it; it is next in line for a slot
    assert assignment.task_id == task_id
    assert not quiet.done()
    quiet.cancel()


async def test_a_model_task_prefers_the_agent_holding_its_model(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    other = await FakeAgent.ready(broker_channel, "other", runs_models=True, workloads=())
    holder = FakeAgent(broker_channel, "holder", runs_models=True, workloads=(), models=[MODEL])
    await holder.next()
    quiet = asyncio.ensure_future(other.next())

    task = await _queue_model_task(broker_server)
    reason = broker_server.dispatcher.waiting_for(task)
    holder.credit()
    assignment = (await holder.next()).assignment

    assert reason == f"waiting for an agent that holds its model (up to {AFFINITY_WAIT_S:g} s)"
    assert assignment.task_id == task.id
    assert not quiet.done()
    quiet.cancel()


async def test_a_model_task_falls_back_to_any_agent_after_the_bounded_wait(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    other = await FakeAgent.ready(broker_channel, "other", runs_models=True, workloads=())
    holder = FakeAgent(broker_channel, "holder", runs_models=True, workloads=(), models=[MODEL])
    await holder.next()  # connected, holds the model, never grants credit

    started = time.monotonic()
    task = await _queue_model_task(broker_server)
    assignment = (await other.next()).assignment  # only the wait's timer can wake the round
    waited = time.monotonic() - started

    assert assignment.task_id == task.id
    assert AFFINITY_WAIT_S * 0.9 <= waited < AFFINITY_WAIT_S + 5


async def test_a_heartbeat_that_drops_the_model_ends_the_wait_at_once(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    other = await FakeAgent.ready(broker_channel, "other", runs_models=True, workloads=())
    holder = FakeAgent(broker_channel, "holder", runs_models=True, workloads=(), models=[MODEL])
    await holder.next()
    task = await _queue_model_task(broker_server)
    assert broker_server.dispatcher.waiting_for(task).startswith("waiting for an agent that holds")

    holder.heartbeat(models=[])
    await wait_for(lambda: not broker_server.registry.holders(MODEL), 5, "the holder to drop it")
    assignment = (await other.next()).assignment

    assert assignment.task_id == task.id
    assert broker_server.registry.holders(MODEL) == frozenset()
    assert GpuRequirement() == task.requires

"""GetStatus over real gRPC: a tenant sees its share, an operator the whole broker; GetTask
names the agent of each attempt and a queued task's place in the queue."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from datetime import UTC, datetime

import grpc
import pytest

from gpubroker.broker.api.status_page import render_status_page
from gpubroker.broker.core.status import Status, TaskLine
from gpubroker.broker.model import AttemptRecord, FailureCode, Task, TaskState
from gpubroker.broker.server import BrokerServer
from gpubroker.protos import broker_pb2, broker_pb2_grpc
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import bearer, status_code, submit
from tests.support.waiting import wait_for_async

SETTINGS: dict[str, object] = {
    "api_keys": {"key-a": "tenant-a", "key-b": "tenant-b", "key-ops": "ops:operator"},
    "join_token": JOIN_TOKEN,
    "heartbeat_interval_s": 0.2,
    "lease_timeout_s": 1.0,
}


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return SETTINGS


async def _status(channel: grpc.aio.Channel, key: str) -> broker_pb2.GetStatusResponse:
    stub = broker_pb2_grpc.BrokerStub(channel)
    reply: broker_pb2.GetStatusResponse = await stub.GetStatus(
        broker_pb2.GetStatusRequest(), metadata=bearer(key)
    )
    return reply


async def _task(channel: grpc.aio.Channel, task_id: str, key: str) -> broker_pb2.GetTaskResponse:
    stub = broker_pb2_grpc.BrokerStub(channel)
    reply: broker_pb2.GetTaskResponse = await stub.GetTask(
        broker_pb2.GetTaskRequest(task_id=task_id), metadata=bearer(key)
    )
    return reply


async def test_a_tenant_sees_its_share_and_an_operator_everything(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    agent = await FakeAgent.ready(broker_channel, "agent-1", slots=1)
    running = await submit(broker_channel, b"first", key="key-a")
    assignment = (await agent.next()).assignment
    queued_a = await submit(broker_channel, b"second", key="key-a")
    queued_b = await submit(broker_channel, b"third", key="key-b")

    tenant = await _status(broker_channel, "key-a")
    operator = await _status(broker_channel, "key-ops")

    assert assignment.task_id == running
    assert (tenant.tenant, tenant.operator_view) == ("tenant-a", False)
    assert [(q.tenant, q.workload, q.depth) for q in tenant.queue] == [("tenant-a", "echo", 1)]
    assert (tenant.queued_tasks, tenant.running_tasks) == (1, 1)
    assert not tenant.agents and not tenant.machines
    assert (tenant.agent_count, tenant.free_slots) == (1, 0)
    assert {t.task_id for t in tenant.recent_tasks} == {running, queued_a}
    assert (operator.tenant, operator.operator_view) == ("ops", True)
    assert sorted((q.tenant, q.depth) for q in operator.queue) == [
        ("tenant-a", 1),
        ("tenant-b", 1),
    ]
    assert (operator.queued_tasks, operator.running_tasks) == (2, 1)
    [seen] = operator.agents
    assert (seen.agent_id, seen.slots, seen.busy_slots, seen.free_slots) == ("agent-1", 1, 1, 0)
    assert list(seen.task_ids) == [running]
    assert seen.connected_at.seconds > 0
    assert {t.task_id for t in operator.recent_tasks} == {running, queued_a, queued_b}
    assert all(q.oldest_wait_seconds >= 0 for q in operator.queue)


async def test_task_status_names_each_attempts_agent_and_the_queue_position(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    first = await FakeAgent.ready(broker_channel, "agent-1", slots=1)
    task_id = await submit(broker_channel, b"work", key="key-a")
    await first.next()
    behind = [await submit(broker_channel, bytes([i]), key="key-a") for i in range(2)]
    first.call.cancel()  # the agent dies: its attempt is lost and the task queued again

    async def requeued() -> bool:
        task = (await _task(broker_channel, task_id, "key-a")).task
        return task.queue_position == 1

    await wait_for_async(requeued, 10, "the lost task back at the head of the queue")
    second = await FakeAgent.ready(broker_channel, "agent-2", slots=1)
    assignment = (await second.next()).assignment
    await second.put(assignment, b"done")

    done = (await _task(broker_channel, task_id, "key-a")).task
    waiting = (await _task(broker_channel, behind[1], "key-a")).task
    listed = await broker_pb2_grpc.BrokerStub(broker_channel).ListTasks(
        broker_pb2.ListTasksRequest(), metadata=bearer("key-a")
    )

    assert assignment.task_id == task_id
    assert [(a.number, a.agent_id, a.outcome) for a in done.attempts] == [
        (1, "agent-1", "lost"),
        (2, "agent-2", "succeeded"),
    ]
    assert done.attempts[0].detail and done.attempts[0].ended_at.seconds > 0
    assert done.attempts[1].ended_at == done.finished_at
    assert done.queue_position == 0
    assert waiting.queue_position == 2  # behind[0] goes first
    positions = {t.task_id: t.queue_position for t in listed.tasks}
    assert positions == {task_id: 0, behind[0]: 1, behind[1]: 2}


async def test_a_bad_key_gets_no_status(broker_channel: grpc.aio.Channel) -> None:
    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    call = stub.GetStatus(broker_pb2.GetStatusRequest(), metadata=bearer("nope"))

    assert await status_code(call) == grpc.StatusCode.UNAUTHENTICATED


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize(
    "broker_overrides", [{**SETTINGS, "metrics_address": "0.0.0.0:0"}], ids=["public"]
)
async def test_the_page_on_a_public_address_needs_an_operator_key(
    broker_server: BrokerServer,
) -> None:
    base = f"http://127.0.0.1:{broker_server.metrics_port}"

    def fetch(path: str, key: str | None = None) -> tuple[int, str]:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        return _get(base + path, headers)

    replies = await asyncio.gather(
        *(
            asyncio.to_thread(fetch, path, key)
            for path, key in [
                ("/status", None),
                ("/status", "key-a"),
                ("/status", "wrong"),
                ("/status", "key-ops"),
                ("/status?key=key-ops", None),
                ("/status.json", "key-ops"),
            ]
        )
    )

    codes = [code for code, _ in replies]
    assert codes == [401, 403, 401, 200, 200, 200]
    assert "gpubroker status" in replies[3][1]
    assert 'url=?key=key-ops"' in replies[4][1]  # the reload keeps the key
    assert '"operatorView": true' in replies[5][1]


def test_the_page_escapes_what_tenants_wrote() -> None:
    now = datetime(2027, 1, 5, tzinfo=UTC)
    task = Task(
        id="t1", tenant="a", workload="echo", params={}, priority=0, state=TaskState.FAILED,
        attempt=1, inputs=(), outputs=(), input_bytes=0, output_bytes=0, created_at=now,
        error_code=FailureCode.INVALID_ARGUMENT, error_message="<script>alert(1)</script>",
    )  # fmt: skip
    attempt = AttemptRecord(1, "agent-<b>", "cpu", now, now, "failed", "", "")
    status = Status(now, "a", True, recent_tasks=(TaskLine(task, (attempt,)),))

    page = render_status_page(status, refresh_s=7)

    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "agent-&lt;b&gt;" in page
    assert '<meta http-equiv="refresh" content="7">' in page
    assert '<span id="queued-tasks">0</span>' in page

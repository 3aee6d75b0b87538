"""Sending hostile cases to one broker, and the harness that checks how each one ended."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from gpubroker.broker.server import BrokerServer
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from tests.e2e.hostile.cases import DETAILS, OK, TENANT_KEYS, Case, Job, Part, Tensor, inline_task
from tests.support.rpc import Metadata, bearer

# -- sending -----------------------------------------------------------------------------------


def stream_messages(cls: Any, parts: Sequence[Part]) -> Iterator[Any]:
    for part in parts:
        if part is None:
            yield cls()
        elif isinstance(part, bytes):
            yield cls(chunk=task_pb2.DataChunk(data=part))
        else:
            yield cls(header=part)


async def submit_parts(h: Harness, parts: Sequence[Part], metadata: Metadata) -> Any:
    requests = stream_messages(broker_pb2.SubmitRequest, parts)
    return await h.stub.Submit(requests, metadata=metadata, timeout=30)


async def run_parts(h: Harness, parts: Sequence[Part], metadata: Metadata) -> tuple[Any, bytes]:
    call = h.stub.Run(stream_messages(broker_pb2.RunRequest, parts), metadata=metadata, timeout=30)
    task, data = task_pb2.TaskInfo(), bytearray()
    async for response in call:
        if response.WhichOneof("kind") == "task":
            task = response.task
        else:
            data += response.chunk.data
    return task, bytes(data)


async def call_with_id(h: Harness, rpc: str, task_id: str, metadata: Metadata) -> None:
    if rpc == "get":
        get = broker_pb2.GetTaskRequest(task_id=task_id)
        await h.stub.GetTask(get, metadata=metadata, timeout=30)
    elif rpc == "cancel":
        cancel = broker_pb2.CancelTaskRequest(task_id=task_id)
        await h.stub.CancelTask(cancel, metadata=metadata, timeout=30)
    elif rpc == "watch":
        watch = broker_pb2.WatchTaskRequest(task_id=task_id)
        async for _ in h.stub.WatchTask(watch, metadata=metadata, timeout=30):
            pass
    else:
        result = broker_pb2.GetResultRequest(task_id=task_id)
        async for _ in h.stub.GetResult(result, metadata=metadata, timeout=30):
            pass


async def run_many(h: Harness, requests: list[Any], metadata: Metadata) -> list[Any]:
    call = h.stub.RunMany(iter(requests), metadata=metadata, timeout=30)
    return [outcome async for response in call for outcome in response.outcomes]


def assert_echoed(task: Any, data: bytes, job: Job) -> None:
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task
    assert [(o.dtype, tuple(o.shape)) for o in task.outputs] == [
        (t.dtype, t.shape) for t in job.inputs
    ]
    assert data == job.data


async def send_stream(rpc: str, key: str, parts: Sequence[Part], h: Harness) -> None:
    if rpc == "submit":
        await submit_parts(h, parts, bearer(key))
    else:
        await run_parts(h, parts, bearer(key))


async def send_valid(rpc: str, key: str, job: Job, h: Harness) -> None:
    if rpc == "submit":
        reply = await submit_parts(h, job.parts(), bearer(key))
        h.pending[reply.task_id] = (key, job)
        h.owned[key].append(reply.task_id)
    else:
        task, data = await run_parts(h, job.parts(), bearer(key))
        assert_echoed(task, data, job)
        h.owned[key].append(task.task_id)
    h.created[key] += 1


async def send_task_id(rpc: str, key: str, task_id: str, h: Harness) -> None:
    await call_with_id(h, rpc, task_id, bearer(key))


async def send_foreign_id(rpc: str, key: str, pick: int, h: Harness) -> None:
    theirs = next(h.owned[k] for k in TENANT_KEYS if k != key)
    task_id = theirs[pick % len(theirs)] if theirs else uuid.uuid4().hex
    await call_with_id(h, rpc, task_id, bearer(key))


async def send_unauthenticated(rpc: str, metadata: Metadata, job: Job, h: Harness) -> None:
    if rpc == "submit":
        await submit_parts(h, job.parts(), metadata)
    elif rpc == "run":
        await run_parts(h, job.parts(), metadata)
    elif rpc == "run_many":
        batch = broker_pb2.RunManyRequest(tasks=[inline_task(0, job.header(), job.data)])
        await run_many(h, [batch], metadata)
    elif rpc == "list":
        await h.stub.ListTasks(broker_pb2.ListTasksRequest(), metadata=metadata, timeout=30)
    elif rpc == "usage":
        await h.stub.GetUsage(broker_pb2.GetUsageRequest(), metadata=metadata, timeout=30)
    else:
        await call_with_id(h, rpc, uuid.uuid4().hex, metadata)


async def send_list(key: str, request: Any, h: Harness) -> None:
    await h.stub.ListTasks(request, metadata=bearer(key), timeout=30)


async def send_oversize(rpc: str, key: str, size: int, h: Harness) -> None:
    # A small, valid header: only the size of the next message is wrong.
    tensor = Tensor("uint8", (4,), b"abcd")
    job = Job((tensor,), 0, 0.0, ())
    if rpc == "submit":
        await submit_parts(h, [job.header(), bytes(size)], bearer(key))
    elif rpc == "get":
        await call_with_id(h, "get", "x" * size, bearer(key))
    else:
        batch = broker_pb2.RunManyRequest(tasks=[inline_task(0, job.header(), bytes(size))])
        await run_many(h, [batch], bearer(key))


async def send_run_many(
    key: str, items: Sequence[tuple[Any, str, Job | None]], split: int, h: Harness
) -> None:
    tasks = [task for task, _, _ in items]
    requests = [broker_pb2.RunManyRequest(tasks=tasks[:split])]
    requests.append(broker_pb2.RunManyRequest(tasks=tasks[split:]))
    outcomes = await run_many(h, requests, bearer(key))

    got = sorted((o.index, o.error_code) for o in outcomes)
    assert got == sorted((task.index, code) for task, code, _ in items), outcomes
    for task, _, job in items:
        if job is not None:
            (outcome,) = [o for o in outcomes if o.index == task.index and not o.error_code]
            assert outcome.data_inline
            assert_echoed(outcome.task, outcome.data, job)
            h.owned[key].append(outcome.task.task_id)
            h.created[key] += 1


async def send_conflict(key: str, first: Job, second: Job, h: Harness) -> None:
    request_id = uuid.uuid4().hex
    reply = await submit_parts(h, first.parts(request_id=request_id), bearer(key))
    h.pending[reply.task_id] = (key, first)
    h.owned[key].append(reply.task_id)
    h.created[key] += 1
    again = await submit_parts(h, first.parts(request_id=request_id), bearer(key))
    assert again.deduplicated and again.task_id == reply.task_id

    await submit_parts(h, second.parts(request_id=request_id), bearer(key))


async def send_refused_by_agent(
    key: str, job: Job, params: dict[str, task_pb2.ParamValue], h: Harness
) -> None:
    h.created[key] += 1  # the task is accepted, then fails on the agent
    h.failed[key] += 1
    await run_parts(h, job.parts(params=params), bearer(key))


# -- the broker under test -----------------------------------------------------------------------


class Harness:
    """One broker, one agent, one channel, and what the valid tasks must come back as."""

    def __init__(self, server: BrokerServer, spool_dir: Path, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.spool_dir = spool_dir
        self.stub = broker_pb2_grpc.BrokerStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.pending: dict[str, tuple[str, Job]] = {}
        """Valid tasks submitted without waiting: task id -> (API key, job)."""
        self.owned: dict[str, list[str]] = {key: [] for key in TENANT_KEYS}
        self.created: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.hostile = 0

    async def check(self, case: Case) -> None:
        """Sends one case and asserts it ended with its status code and a message."""
        self.sent[case.family] += 1
        self.hostile += case.hostile
        try:
            await case.send(self)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        else:
            code, details = OK, ""
        assert code == case.expected, f"{case}: got {code.name}: {details}"
        assert code == OK or details.strip(), f"{case}: {code.name} without a message"
        assert DETAILS.get(case.family, "").lower() in details.lower(), f"{case}: {details}"

    async def tasks(self, key: str) -> list[Any]:
        """Every task of the key's tenant."""
        found: list[Any] = []
        token = ""
        while True:
            request = broker_pb2.ListTasksRequest(page_size=1000, page_token=token)
            page = await self.stub.ListTasks(request, metadata=bearer(key), timeout=30)
            found += page.tasks
            if not (token := page.next_page_token):
                return found

    async def result(self, key: str, task_id: str) -> tuple[Any, bytes]:
        """A task's final state and output bytes."""
        request = broker_pb2.GetResultRequest(task_id=task_id)
        header, data = None, bytearray()
        async for response in self.stub.GetResult(request, metadata=bearer(key), timeout=60):
            if response.WhichOneof("kind") == "header":
                header = response.header
            else:
                data += response.chunk.data
        return header, bytes(data)

"""``Client`` and ``AsyncClient`` against a hand-written fake broker on a real loopback port.

The fake echoes each task's inputs back as its outputs, so a round trip shows the bytes survive
both directions bit-exact. Every test runs once per client: the blocking ``Client`` runs in a
worker thread (the fake serves on the test's event loop), behind the async client's surface.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from gpubroker.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    TaskCancelledError,
    TaskFailedError,
    TaskHandle,
    TaskState,
    UnavailableError,
)
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.convert import params_from_proto
from gpubroker.protos.wire import iter_chunks

KEY = "key-of-tenant-a"
Context = grpc.aio.ServicerContext[Any, Any]
_FINAL = (task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED, task_pb2.TASK_STATE_CANCELLED)


class FakeBroker(broker_pb2_grpc.BrokerServicer):
    """Echo tasks succeed at once; ``hold`` ones stay queued until cancelled; ``fail`` ones fail."""

    def __init__(self) -> None:
        self.tasks: dict[str, task_pb2.TaskInfo] = {}
        self.payloads: dict[str, bytes] = {}
        self.params: dict[str, dict[str, int | float | str | bool]] = {}
        self.authorizations: list[str] = []
        self.request_ids: list[str] = []
        self.time_remaining: list[float | None] = []
        self.unavailable_submits = 0
        self.map_batches: list[int] = []
        """How many Submits to answer UNAVAILABLE after storing the task (a lost reply)."""

    async def Submit(
        self, request_iterator: AsyncIterator[broker_pb2.SubmitRequest], context: Context
    ) -> broker_pb2.SubmitResponse:
        info, deduplicated = await self._receive(request_iterator, context)
        if self.unavailable_submits:
            self.unavailable_submits -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the reply was lost")
        return broker_pb2.SubmitResponse(task_id=info.task_id, deduplicated=deduplicated)

    async def Run(
        self, request_iterator: AsyncIterator[broker_pb2.RunRequest], context: Context
    ) -> AsyncIterator[broker_pb2.RunResponse]:
        info, _ = await self._receive(request_iterator, context)
        yield broker_pb2.RunResponse(
            task=task_pb2.TaskInfo(task_id=info.task_id, state=task_pb2.TASK_STATE_QUEUED)
        )
        info, chunks = await self._outcome(info.task_id, context)
        yield broker_pb2.RunResponse(task=info)
        for chunk in chunks:
            yield broker_pb2.RunResponse(chunk=chunk)

    async def RunMany(
        self, request_iterator: AsyncIterator[broker_pb2.RunManyRequest], context: Context
    ) -> AsyncIterator[broker_pb2.RunManyResponse]:
        """Answers each request's tasks in reverse order; ``fetch`` ones leave the bytes behind
        (as the broker does for large outputs), ``refuse`` ones are refused."""
        await self._authorize(context)
        async for request in request_iterator:
            self.map_batches.append(len(request.tasks))
            outcomes = [self._run_inline(task) for task in reversed(request.tasks)]
            yield broker_pb2.RunManyResponse(outcomes=outcomes)

    def _run_inline(self, task: broker_pb2.InlineTask) -> broker_pb2.InlineOutcome:
        header = task.header
        self.request_ids.append(header.request_id)
        if header.workload == "refuse":
            return broker_pb2.InlineOutcome(
                index=task.index, error_code="INVALID_ARGUMENT", error_message="refused"
            )
        info = task_pb2.TaskInfo(task_id=uuid.uuid4().hex, workload=header.workload)
        info.inputs.extend(header.inputs)
        if header.workload == "fail":
            info.state, info.error_code = task_pb2.TASK_STATE_FAILED, "ABORTED"
            info.error_message = "ValueError: boom"
            return broker_pb2.InlineOutcome(index=task.index, task=info)
        info.state = task_pb2.TASK_STATE_SUCCEEDED
        info.outputs.extend(header.inputs)
        self.tasks[info.task_id] = info
        self.payloads[info.task_id] = task.data
        if header.workload == "fetch":
            return broker_pb2.InlineOutcome(index=task.index, task=info)
        return broker_pb2.InlineOutcome(
            index=task.index, task=info, data=task.data, data_inline=True
        )

    async def GetResult(
        self, request: broker_pb2.GetResultRequest, context: Context
    ) -> AsyncIterator[broker_pb2.GetResultResponse]:
        await self._find(request.task_id, context)
        info, chunks = await self._outcome(request.task_id, context)
        yield broker_pb2.GetResultResponse(header=info)
        for chunk in chunks:
            yield broker_pb2.GetResultResponse(chunk=chunk)

    async def WatchTask(
        self, request: broker_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[broker_pb2.WatchTaskResponse]:
        info = await self._find(request.task_id, context)
        while info.state not in _FINAL:
            await asyncio.sleep(0.01)
        yield broker_pb2.WatchTaskResponse(task=info)

    async def GetTask(
        self, request: broker_pb2.GetTaskRequest, context: Context
    ) -> broker_pb2.GetTaskResponse:
        return broker_pb2.GetTaskResponse(task=await self._find(request.task_id, context))

    async def CancelTask(
        self, request: broker_pb2.CancelTaskRequest, context: Context
    ) -> broker_pb2.CancelTaskResponse:
        info = await self._find(request.task_id, context)
        if info.state not in _FINAL:
            info.state, info.error_message = task_pb2.TASK_STATE_CANCELLED, "cancelled by owner"
        return broker_pb2.CancelTaskResponse(task=info)

    async def ListTasks(
        self, request: broker_pb2.ListTasksRequest, context: Context
    ) -> broker_pb2.ListTasksResponse:
        await self._authorize(context)
        newest_first = [t for t in reversed(self.tasks.values()) if t.state in request.states]
        start = int(request.page_token or 0)
        end = start + request.page_size
        token = str(end) if end < len(newest_first) else ""
        return broker_pb2.ListTasksResponse(tasks=newest_first[start:end], next_page_token=token)

    async def GetUsage(
        self, request: broker_pb2.GetUsageRequest, context: Context
    ) -> broker_pb2.GetUsageResponse:
        await self._authorize(context)
        return broker_pb2.GetUsageResponse(tenant="a", tasks=2, cost_nanousd=17_750_000)

    async def _authorize(self, context: Context) -> None:
        value = dict(context.invocation_metadata() or ()).get("authorization", "")
        self.authorizations.append(str(value))
        if value != f"Bearer {KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")

    async def _find(self, task_id: str, context: Context) -> task_pb2.TaskInfo:
        await self._authorize(context)
        if task_id not in self.tasks:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no task {task_id!r}")
        return self.tasks[task_id]

    async def _receive(
        self,
        requests: AsyncIterator[broker_pb2.SubmitRequest] | AsyncIterator[broker_pb2.RunRequest],
        context: Context,
    ) -> tuple[task_pb2.TaskInfo, bool]:
        # Like the real broker, read the (small) upload before refusing it: a grpc.aio client
        # still writing when the call ends may report INTERNAL instead of the status.
        messages = [m async for m in requests]
        await self._authorize(context)
        header = messages[0].header
        self.request_ids.append(header.request_id)
        self.time_remaining.append(context.time_remaining())
        known = [t for t in self.tasks.values() if t.request_id == header.request_id]
        if known:
            return known[0], True
        info = task_pb2.TaskInfo(
            task_id=uuid.uuid4().hex, workload=header.workload, request_id=header.request_id
        )
        info.inputs.extend(header.inputs)
        if header.workload == "fail":
            info.state, info.error_code = task_pb2.TASK_STATE_FAILED, "ABORTED"
            info.error_message = "ValueError: boom"
        elif header.workload == "hold":
            info.state = task_pb2.TASK_STATE_QUEUED
        else:
            info.state = task_pb2.TASK_STATE_SUCCEEDED
            info.outputs.extend(header.inputs)
        self.tasks[info.task_id] = info
        self.payloads[info.task_id] = b"".join(m.chunk.data for m in messages[1:])
        self.params[info.task_id] = params_from_proto(header.params)
        return info, False

    async def _outcome(
        self, task_id: str, context: Context
    ) -> tuple[task_pb2.TaskInfo, list[task_pb2.DataChunk]]:
        info = self.tasks[task_id]
        while info.state not in _FINAL:
            await asyncio.sleep(0.01)
        if info.state == task_pb2.TASK_STATE_CANCELLED:
            await context.abort(grpc.StatusCode.CANCELLED, info.error_message)
        if info.state == task_pb2.TASK_STATE_FAILED:
            await context.abort(grpc.StatusCode[info.error_code], info.error_message)
        # Small chunks, so outputs span chunk boundaries on the way back too.
        chunks = iter_chunks([self.payloads[task_id]], 5)
        return info, [task_pb2.DataChunk(data=c) for c in chunks]


class _InThread:
    """Gives a blocking ``Client`` or ``TaskHandle`` the async surface: calls run in a thread."""

    def __init__(self, target: Client | TaskHandle) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name == "task":  # no I/O, and not a coroutine on AsyncClient either
            return lambda *args, **kwargs: _InThread(attr(*args, **kwargs))
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            value = await asyncio.to_thread(attr, *args, **kwargs)
            return _InThread(value) if isinstance(value, TaskHandle) else value

        return call


@pytest.fixture
async def broker() -> AsyncIterator[tuple[FakeBroker, str]]:
    fake = FakeBroker()
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(fake, server)
    port = server.add_insecure_port("localhost:0")
    await server.start()
    try:
        yield fake, f"localhost:{port}"
    finally:
        await server.stop(grace=None)


@pytest.fixture(params=["Client", "AsyncClient"])
async def connect(
    request: pytest.FixtureRequest, broker: tuple[FakeBroker, str]
) -> AsyncIterator[Callable[[str | None], Any]]:
    """Opens clients of one flavour with a given API key; all are closed afterwards."""
    opened: list[Client | AsyncClient] = []

    def open_client(api_key: str | None) -> Any:
        # A tiny chunk size makes every input span several chunks, and chunks span inputs.
        if request.param == "Client":
            opened.append(Client(broker[1], api_key, chunk_bytes=7))
            return _InThread(opened[-1])  # type: ignore[arg-type]
        opened.append(AsyncClient(broker[1], api_key, chunk_bytes=7))
        return opened[-1]

    yield open_client
    for client in opened:
        if isinstance(client, AsyncClient):
            await client.close()
        else:
            client.close()


@pytest.fixture
def fake(broker: tuple[FakeBroker, str]) -> FakeBroker:
    return broker[0]


@pytest.fixture
def client(connect: Callable[[str | None], Any]) -> Any:
    return connect(KEY)


def _torch_inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [
        torch.randn(3, 5, generator=generator).to(torch.float16),
        torch.randn(4, generator=generator).to(torch.bfloat16),
        torch.tensor([float("nan"), -0.0, float("inf"), 1e-310], dtype=torch.float64),
        torch.randint(-128, 128, (9,), generator=generator, dtype=torch.int8),
        torch.rand(6, generator=generator) > 0.5,
        torch.randn(2, 3, generator=generator, dtype=torch.complex64),
        torch.tensor(3.25),
        torch.empty(0, 4),
        torch.arange(12.0).reshape(3, 4).t(),
    ]


def _numpy_inputs() -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    return [
        rng.standard_normal((3, 5)).astype(np.float16),
        np.array([np.nan, -0.0, np.inf, 1e-310]),
        rng.integers(-128, 128, 9, dtype=np.int8),
        rng.random(6) > 0.5,
        (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        np.array(3.25, dtype=np.float32),
        np.empty((0, 4), dtype=np.int64),
        np.arange(24, dtype=np.uint8).reshape(4, 6)[:, ::2],
    ]


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same_tensors(sent: list[torch.Tensor], got: tuple[Any, ...]) -> None:
    assert len(got) == len(sent)
    for a, b in zip(sent, got, strict=True):
        assert isinstance(b, torch.Tensor)
        assert (b.dtype, b.shape) == (a.dtype, a.shape)
        assert _bits(b) == _bits(a)


async def test_torch_tensors_of_every_dtype_and_layout_come_back_bit_exact_from_run(
    client: Any,
) -> None:
    inputs = _torch_inputs()

    result = await client.run("echo", inputs)

    _assert_same_tensors(inputs, result.outputs)


async def test_torch_tensors_come_back_bit_exact_from_a_submitted_task(client: Any) -> None:
    inputs = _torch_inputs()

    handle = await client.submit("echo", inputs)
    result = await handle.result(timeout=10)

    _assert_same_tensors(inputs, result.outputs)
    assert result.task_id == handle.task_id


async def test_numpy_inputs_come_back_as_numpy_arrays_bit_exact(client: Any) -> None:
    inputs = _numpy_inputs()

    result = await client.run("echo", inputs)

    for sent, got in zip(inputs, result.outputs, strict=True):
        assert isinstance(got, np.ndarray)
        assert (got.dtype, got.shape) == (sent.dtype, sent.shape)
        assert got.tobytes() == sent.tobytes()


async def test_a_single_tensor_has_a_single_output(client: Any) -> None:
    result = await client.run("echo", np.arange(5.0), output="torch")

    assert torch.equal(result.output, torch.arange(5.0, dtype=torch.float64))


async def test_a_result_can_be_fetched_later_by_task_id_in_either_kind(client: Any) -> None:
    handle = await client.submit("echo", [np.arange(4, dtype=np.int32)])

    as_torch = await client.task(handle.task_id).result()
    as_numpy = await client.task(handle.task_id).result(output="numpy")

    assert torch.equal(as_torch.output, torch.arange(4, dtype=torch.int32))
    assert isinstance(as_numpy.output, np.ndarray)


async def test_the_api_key_arrives_as_bearer_metadata_on_every_call(
    client: Any, fake: FakeBroker
) -> None:
    handle = await client.submit("echo", torch.ones(1))
    await handle.status()
    await handle.result()

    assert fake.authorizations == [f"Bearer {KEY}"] * 3


@pytest.mark.parametrize("api_key", ["wrong-key", None])
async def test_a_wrong_or_missing_api_key_is_an_authentication_error(
    connect: Callable[[str | None], Any], api_key: str | None
) -> None:
    with pytest.raises(AuthenticationError, match="unknown API key"):
        await connect(api_key).run("echo", torch.ones(1))


async def test_an_unknown_task_id_is_not_found(client: Any) -> None:
    with pytest.raises(NotFoundError, match="no task 'nope'") as excinfo:
        await client.task("nope").status()

    assert excinfo.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError):
        await client.task("nope").result()


async def test_a_workload_that_raised_is_a_task_failed_error(client: Any) -> None:
    with pytest.raises(TaskFailedError, match="ValueError: boom"):
        await client.run("fail", torch.ones(1))

    handle = await client.submit("fail", torch.ones(1))
    with pytest.raises(TaskFailedError):
        await handle.result()
    status = await handle.wait(timeout=10)
    assert (status.state, status.error_code) == (TaskState.FAILED, "ABORTED")


async def test_parameters_arrive_with_their_types(client: Any, fake: FakeBroker) -> None:
    handle = await client.submit("echo", torch.ones(1), n=3, scale=0.5, mode="fast", flag=True)

    params = fake.params[handle.task_id]

    assert params == {"n": 3, "scale": 0.5, "mode": "fast", "flag": True}
    assert type(params["flag"]) is bool and type(params["n"]) is int


async def test_a_parameter_of_a_bad_type_fails_before_anything_is_sent(
    client: Any, fake: FakeBroker
) -> None:
    with pytest.raises(TypeError, match="parameter 'weights' is a list"):
        await client.run("echo", torch.ones(1), weights=[1, 2])

    assert fake.tasks == {}


async def test_submit_is_retried_on_unavailable_with_the_same_request_id(
    client: Any, fake: FakeBroker
) -> None:
    fake.unavailable_submits = 2

    handle = await client.submit("echo", torch.ones(1))

    assert len(fake.request_ids) == 3 and len(set(fake.request_ids)) == 1
    assert list(fake.tasks) == [handle.task_id]


async def test_submit_gives_up_after_three_unavailable_attempts(
    client: Any, fake: FakeBroker
) -> None:
    fake.unavailable_submits = 3

    with pytest.raises(UnavailableError):
        await client.submit("echo", torch.ones(1), request_id="mine")

    assert fake.request_ids == ["mine"] * 3


async def test_the_run_timeout_becomes_the_calls_deadline(client: Any, fake: FakeBroker) -> None:
    await client.run("echo", torch.ones(1), timeout=30)
    await client.run("echo", torch.ones(1))

    first, second = fake.time_remaining
    # gRPC sends the time left as the timeout header, reckoned from a clock reading its core
    # caches per batch of work: on a loaded machine the server has seen up to ~0.1 s more
    # than the 30 s asked. A deadline of some other size, or none, still fails here.
    assert first is not None and 29 < first <= 30.5
    assert second is None


async def test_waiting_longer_than_the_timeout_is_a_deadline_exceeded_timeout_error(
    client: Any,
) -> None:
    handle = await client.submit("hold", torch.ones(1))

    with pytest.raises(DeadlineExceededError) as excinfo:
        await handle.result(timeout=0.2)
    with pytest.raises(TimeoutError):
        await client.run("hold", torch.ones(1), timeout=0.2)

    assert excinfo.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert not await handle.done()


async def test_a_cancelled_task_is_final_and_its_result_raises_task_cancelled(
    client: Any,
) -> None:
    handle = await client.submit("hold", torch.ones(1))
    assert (await handle.status()).state is TaskState.QUEUED

    status = await handle.cancel()

    assert status.state is TaskState.CANCELLED and await handle.done()
    assert (await handle.wait()).state is TaskState.CANCELLED
    with pytest.raises(TaskCancelledError, match="cancelled by owner"):
        await handle.result()


async def test_an_input_dtype_the_wire_cannot_carry_is_refused_before_sending(
    client: Any, fake: FakeBroker
) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        await client.run("echo", np.array(["text"]))

    assert fake.tasks == {}


async def test_listing_follows_pages_newest_first_and_filters_by_state(client: Any) -> None:
    held = [(await client.submit("hold", torch.ones(1))).task_id for _ in range(5)]
    await client.run("echo", torch.ones(1))

    queued = await client.list_tasks([TaskState.QUEUED], limit=4)
    everything = await client.list_tasks([TaskState.QUEUED, TaskState.SUCCEEDED])

    assert [t.task_id for t in queued] == held[::-1][:4]
    assert len(everything) == 6 and everything[0].state is TaskState.SUCCEEDED


async def test_usage_is_reported_in_exact_dollars(client: Any) -> None:
    usage = await client.usage()

    assert (usage.tenant, usage.tasks, usage.cost_usd) == ("a", 2, Decimal("0.017750000"))
    assert usage.monthly_budget_usd is None


async def _map(client: Any, workload: str, items: list[Any], **kwargs: Any) -> list[Any]:
    """Runs ``map`` to the end with either client flavour."""
    if isinstance(client, AsyncClient):
        return [r async for r in client.map(workload, items, **kwargs)]
    sync = client._target
    return await asyncio.to_thread(lambda: list(sync.map(workload, items, **kwargs)))


async def test_map_returns_results_in_input_order_in_batches_bit_exact(
    client: Any, fake: FakeBroker
) -> None:
    items = [[t, t] for t in _torch_inputs()] * 3  # 27 items, answered in reverse per batch

    results = await _map(client, "echo", items, batch=4, window=6)

    assert len(results) == len(items)
    for sent, result in zip(items, results, strict=True):
        _assert_same_tensors(sent, result.outputs)
    assert max(fake.map_batches) <= 4
    assert sum(fake.map_batches) == len(items)
    assert set(fake.request_ids) == {""}  # a map task carries no idempotency key


async def test_map_fetches_results_that_did_not_ride_along(client: Any) -> None:
    items = [np.arange(5, dtype=np.int16), np.ones((2, 2))]

    results = await _map(client, "fetch", items)

    assert [r.output.tolist() for r in results] == [list(range(5)), [[1.0, 1.0], [1.0, 1.0]]]
    assert all(isinstance(r.output, np.ndarray) for r in results)


@pytest.mark.parametrize(
    ("workload", "error"), [("fail", TaskFailedError), ("refuse", InvalidArgumentError)]
)
async def test_map_raises_a_tasks_error_in_its_turn(
    client: Any, workload: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await _map(client, workload, [torch.ones(1)])


async def test_map_raises_a_bad_item_in_its_turn_and_sends_nothing_for_it(
    client: Any, fake: FakeBroker
) -> None:
    with pytest.raises(TypeError):
        await _map(client, "echo", [torch.ones(1), "not a tensor", torch.ones(1)])


async def test_map_of_nothing_is_empty(client: Any) -> None:
    assert await _map(client, "echo", []) == []

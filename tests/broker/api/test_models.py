"""Users' models through the real Broker and AgentGateway services: upload, isolation, delete,
tasks that name a model, and the agent's FetchModel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from gpubroker.broker.config import ModelLimits
from gpubroker.broker.server import BrokerServer
from gpubroker.protos import agent_pb2, agent_pb2_grpc, broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.modelfile import model_id, workload_for
from gpubroker.protos.wire import crc32c
from tests.broker import modelfiles
from tests.support.rpc import bearer, submit_requests

JOIN = "join-me"
QUOTA = 12_000
SETTINGS: dict[str, object] = {
    "api_keys": {"key-a": "tenant-a", "key-b": "tenant-b"},
    "join_token": JOIN,
    "heartbeat_interval_s": 0.2,
    "lease_timeout_s": 5.0,
    "models": ModelLimits(quota_bytes=QUOTA, max_file_bytes=10_000),
}
A, B = bearer("key-a"), bearer("key-b")


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return SETTINGS


@pytest.fixture
def stub(broker_channel: grpc.aio.Channel) -> broker_pb2_grpc.BrokerAsyncStub:
    return broker_pb2_grpc.BrokerStub(broker_channel)


def _requests(
    data: bytes, chunks: Sequence[bytes] | None, **header: object
) -> list[broker_pb2.UploadModelRequest]:
    fields: dict[str, object] = {"model_id": model_id(data), "size_bytes": len(data)} | header
    messages = [broker_pb2.UploadModelRequest(header=broker_pb2.ModelHeader(**fields))]  # type: ignore[arg-type]
    pieces = (
        chunks if chunks is not None else [data[i : i + 1000] for i in range(0, len(data), 1000)]
    )
    messages += [broker_pb2.UploadModelRequest(chunk=task_pb2.DataChunk(data=c)) for c in pieces]
    return messages


async def upload(
    stub: broker_pb2_grpc.BrokerAsyncStub,
    data: bytes,
    key: tuple[tuple[str, str], ...] = A,
    chunks: Sequence[bytes] | None = None,
    **header: object,
) -> broker_pb2.UploadModelResponse:
    return await stub.UploadModel(iter(_requests(data, chunks, **header)), metadata=key)


async def refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


def _task_header(
    data: bytes, shape: Sequence[int], dtype: str = "float32"
) -> broker_pb2.TaskHeader:
    tensor = bytes(4 * shape[0] * shape[1])
    return broker_pb2.TaskHeader(
        workload=workload_for(model_id(data)),
        inputs=[
            task_pb2.TensorHeader(
                dtype=dtype, shape=list(shape), nbytes=len(tensor), crc32c=crc32c(tensor)
            )
        ],
    )


async def submit_model_task(
    stub: broker_pb2_grpc.BrokerAsyncStub,
    data: bytes,
    key: tuple[tuple[str, str], ...] = A,
    shape: Sequence[int] = (2, 8),
    dtype: str = "float32",
) -> broker_pb2.SubmitResponse:
    header = _task_header(data, shape, dtype)
    tensor = bytes(header.inputs[0].nbytes)
    return await stub.Submit(iter(submit_requests(header, [tensor])), metadata=key)


async def test_an_uploaded_model_is_listed_and_read_back(
    stub: broker_pb2_grpc.BrokerAsyncStub, broker_server: BrokerServer
) -> None:
    data = modelfiles.model_bytes()

    reply = await upload(stub, data, name="mlp", max_batch_size=16, max_queue_delay_seconds=0.01)
    got = await stub.GetModel(broker_pb2.GetModelRequest(model_id=model_id(data)), metadata=A)
    listed = await stub.ListModels(broker_pb2.ListModelsRequest(), metadata=A)

    assert not reply.deduplicated
    info = reply.model
    assert (info.model_id, info.name, info.size_bytes) == (model_id(data), "mlp", len(data))
    assert info.workload == f"model:{model_id(data)}"
    assert [list(s.shape) for s in info.inputs] == [[-1, 8]] and info.batch_dim_varies
    assert (info.max_batch_size, info.max_queue_delay_seconds) == (16, 0.01)
    assert got.model == info
    assert list(listed.models) == [info]
    assert (listed.total_bytes, listed.quota_bytes) == (len(data), QUOTA)
    assert broker_server.models.limits.quota_bytes == QUOTA


async def test_a_held_model_takes_the_header_alone_and_updates_its_options(
    stub: broker_pb2_grpc.BrokerAsyncStub,
) -> None:
    data = modelfiles.model_bytes()
    await upload(stub, data, name="first")

    again = await upload(stub, data, chunks=[], name="second", max_batch_size=4)
    with_bytes = await refusal(upload(stub, data, name="third"))

    assert again.deduplicated
    assert (again.model.name, again.model.max_batch_size) == ("second", 4)
    assert with_bytes.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "send its header alone" in (with_bytes.details() or "")


async def test_another_tenant_must_send_the_bytes_and_cannot_see_the_first_ones_model(
    stub: broker_pb2_grpc.BrokerAsyncStub, broker_server: BrokerServer
) -> None:
    data = modelfiles.model_bytes()
    await upload(stub, data)
    mid = model_id(data)

    get = await refusal(stub.GetModel(broker_pb2.GetModelRequest(model_id=mid), metadata=B))
    delete = await refusal(
        stub.DeleteModel(broker_pb2.DeleteModelRequest(model_id=mid), metadata=B)
    )
    task = await refusal(submit_model_task(stub, data, key=B))
    header_only = await refusal(upload(stub, data, key=B, chunks=[]))
    listed = await stub.ListModels(broker_pb2.ListModelsRequest(), metadata=B)

    for error in (get, delete, task):
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == f"no model {mid}"
    assert header_only.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "declared size that lies" in (header_only.details() or "")
    assert list(listed.models) == []
    reply = await upload(stub, data, key=B)
    assert not reply.deduplicated
    # Both tenants hold the model; they share one file on disk.
    assert len(list((broker_server.spool.root / "models").glob("*.model"))) == 1


async def test_the_quota_is_checked_before_any_byte_arrives(
    stub: broker_pb2_grpc.BrokerAsyncStub,
) -> None:
    first = modelfiles.model_bytes(salt=1500)  # ~6 KB
    second = modelfiles.model_bytes(salt=1600)
    await upload(stub, first)

    error = await refusal(upload(stub, second, chunks=[]))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{len(first)} of {QUOTA} bytes are used" in (error.details() or "")
    assert f"a model of {len(second)} bytes" in (error.details() or "")


def _hostile() -> dict[str, tuple[bytes, dict[str, object], str]]:
    valid = modelfiles.model_bytes()
    other = modelfiles.model_bytes(salt=1)
    pickle = b"\x80\x04\x95" + bytes(40)
    return {
        "hash": (valid, {"model_id": model_id(other)}, "model id mismatch"),
        "longer": (valid, {"size_bytes": len(valid) - 1}, "declared size that lies"),
        "shorter": (valid, {"size_bytes": len(valid) + 1}, "declared size that lies"),
        "truncated": (valid[:-3], {}, "but the file has"),
        "pickle": (modelfiles.model_bytes(weights_section=pickle), {}, "safetensors"),
        "from_file": (
            modelfiles.model_bytes(
                graph_json=modelfiles.graph(["torch.ops.aten.from_file.default"])
            ),
            {},
            "aten::from_file is not allowed",
        ),
        "save": (
            modelfiles.model_bytes(graph_json=modelfiles.graph(["torch.ops.aten.save.default"])),
            {},
            "aten::save is not allowed",
        ),
        "custom": (
            modelfiles.model_bytes(graph_json=modelfiles.graph(["torch.ops.evil.run.default"])),
            {},
            "'torch.ops.evil.run.default' is not allowed",
        ),
        "batching-fixed-shapes": (
            modelfiles.model_bytes(meta=modelfiles.metadata([("float32", [2, 8])], varies=False)),
            {"max_batch_size": 8},
            "batch dimension varies",
        ),
        "batch-too-large": (valid, {"max_batch_size": 5000}, "outside 0..4096"),
        "delay": (valid, {"max_queue_delay_seconds": 11.0}, "outside 0..10"),
        "bad-id": (valid, {"model_id": "ABC"}, "64 lowercase hex"),
        "empty": (valid, {"size_bytes": 0}, "must be positive"),
    }


@pytest.mark.parametrize("case", sorted(_hostile()))
async def test_a_bad_upload_is_invalid_and_stores_nothing(
    stub: broker_pb2_grpc.BrokerAsyncStub, broker_server: BrokerServer, case: str
) -> None:
    data, header, message = _hostile()[case]

    error = await refusal(stub.UploadModel(iter(_requests(data, None, **header)), metadata=A))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")
    listed = await stub.ListModels(broker_pb2.ListModelsRequest(), metadata=A)
    assert list(listed.models) == []
    models = broker_server.spool.root / "models"
    assert [p.name for p in models.rglob("*") if p.is_file()] == []


async def test_a_file_over_the_limit_is_refused_as_too_large(
    stub: broker_pb2_grpc.BrokerAsyncStub,
) -> None:
    data = modelfiles.model_bytes(salt=2600)  # over 10 000 bytes

    error = await refusal(upload(stub, data, chunks=[]))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceeds the limit of 10000 bytes" in (error.details() or "")


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((2, 7), "float32", "input 0 is float32 [2, 7]; the model expects float32 [batch, 8]"),
        ((2, 8), "int32", "input 0 is int32 [2, 8]; the model expects float32 [batch, 8]"),
        ((65, 8), "float32", "batch size 65 is outside 1..64"),
    ],
)
async def test_a_task_whose_inputs_do_not_fit_the_model_is_invalid(
    stub: broker_pb2_grpc.BrokerAsyncStub, shape: tuple[int, int], dtype: str, message: str
) -> None:
    data = modelfiles.model_bytes()
    await upload(stub, data)

    error = await refusal(submit_model_task(stub, data, shape=shape, dtype=dtype))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")


class ModelAgent:
    """A raw control stream of an agent that runs models (the shared FakeAgent runs echo)."""

    def __init__(self, channel: grpc.aio.Channel, agent_id: str = "m1") -> None:
        self.stub = agent_pb2_grpc.AgentGatewayStub(channel)
        self.agent_id = agent_id
        self.metadata = bearer(JOIN)
        self.outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        hello = agent_pb2.AgentHello(
            agent_id=agent_id, gpu_type="cpu", slots=4, workloads=["echo"], runs_models=True
        )
        self.outbox.put_nowait(agent_pb2.AgentMessage(hello=hello))
        self.call = self.stub.Connect(self._messages(), metadata=self.metadata)

    async def _messages(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        while True:
            yield await self.outbox.get()

    async def assignment(self) -> agent_pb2.TaskAssignment:
        """The next assignment (credit granted on the welcome)."""
        while True:
            message = await asyncio.wait_for(self.call.read(), 10)
            assert isinstance(message, agent_pb2.BrokerMessage)
            if message.WhichOneof("kind") == "welcome":
                credit = agent_pb2.AgentCredit(slots=4)
                self.outbox.put_nowait(agent_pb2.AgentMessage(credit=credit))
            for inner in [message, *message.batch.messages]:
                if inner.WhichOneof("kind") == "assignment":
                    return inner.assignment

    async def fetch_model(self, assignment: agent_pb2.TaskAssignment, mid: str) -> bytes:
        attempt = agent_pb2.TaskAttempt(task_id=assignment.task_id, attempt=assignment.attempt)
        request = agent_pb2.FetchModelRequest(agent_id=self.agent_id, attempt=attempt, model_id=mid)
        replies = self.stub.FetchModel(request, metadata=self.metadata)
        return b"".join([r.chunk.data async for r in replies])

    async def put(self, assignment: agent_pb2.TaskAssignment) -> None:
        attempt = agent_pb2.TaskAttempt(task_id=assignment.task_id, attempt=assignment.attempt)
        out = bytes(16)
        header = agent_pb2.ResultHeader(
            agent_id=self.agent_id,
            attempt=attempt,
            outputs=[
                task_pb2.TensorHeader(dtype="float32", shape=[1, 4], nbytes=16, crc32c=crc32c(out))
            ],
            compute_seconds=0.5,
            model_load_seconds=7.0,
            batch_tasks=2,
        )
        messages = [
            agent_pb2.PutResultRequest(header=header),
            agent_pb2.PutResultRequest(chunk=task_pb2.DataChunk(data=out)),
        ]
        await self.stub.PutResult(iter(messages), metadata=self.metadata)


async def test_an_agent_runs_a_model_task_fetching_the_model_for_its_attempt(
    stub: broker_pb2_grpc.BrokerAsyncStub, broker_channel: grpc.aio.Channel
) -> None:
    data = modelfiles.model_bytes()
    other = modelfiles.model_bytes(salt=3)
    await upload(stub, data, max_batch_size=8, max_queue_delay_seconds=0.02)
    await upload(stub, other)
    agent = ModelAgent(broker_channel)
    submitted = await submit_model_task(stub, data)

    assignment = await agent.assignment()
    fetched = await agent.fetch_model(assignment, model_id(data))
    wrong = await refusal(agent.fetch_model(assignment, model_id(other)))
    stale_attempt = agent_pb2.TaskAssignment(task_id=assignment.task_id, attempt=9)
    stale = await refusal(agent.fetch_model(stale_attempt, model_id(data)))
    await agent.put(assignment)
    usage = await stub.GetUsage(broker_pb2.GetUsageRequest(), metadata=A)
    task = (
        await stub.GetTask(broker_pb2.GetTaskRequest(task_id=submitted.task_id), metadata=A)
    ).task

    assert assignment.task_id == submitted.task_id
    ref = assignment.model
    assert (ref.model_id, ref.size_bytes, ref.max_batch_size) == (model_id(data), len(data), 8)
    assert ref.max_queue_delay_seconds == 0.02
    assert fetched == data
    assert wrong.code() == grpc.StatusCode.NOT_FOUND
    assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert (task.model_load_seconds, task.batch_tasks) == (7.0, 2)
    assert usage.compute_seconds == 0.5  # the load time is never billed


async def test_a_model_is_not_deleted_while_a_task_names_it_then_is_with_its_file(
    stub: broker_pb2_grpc.BrokerAsyncStub, broker_server: BrokerServer
) -> None:
    data = modelfiles.model_bytes()
    mid = model_id(data)
    await upload(stub, data, requires=task_pb2.GpuRequirement(gpu_type="cpu"))
    submitted = await submit_model_task(stub, data)
    request = broker_pb2.DeleteModelRequest(model_id=mid)

    busy = await refusal(stub.DeleteModel(request, metadata=A))
    task = (
        await stub.GetTask(broker_pb2.GetTaskRequest(task_id=submitted.task_id), metadata=A)
    ).task
    await stub.CancelTask(broker_pb2.CancelTaskRequest(task_id=submitted.task_id), metadata=A)
    deleted = await stub.DeleteModel(request, metadata=A)
    gone = await refusal(submit_model_task(stub, data))

    assert busy.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "named by 1 queued or running task" in (busy.details() or "")
    assert task.requires.gpu_type == "cpu"  # the model's requirement, as the task named none
    assert deleted.model.model_id == mid
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    assert list((broker_server.spool.root / "models").glob("*.model")) == []


async def test_a_submit_racing_a_delete_is_either_refused_or_blocks_it(
    stub: broker_pb2_grpc.BrokerAsyncStub,
) -> None:
    data = modelfiles.model_bytes()
    await upload(stub, data)
    request = broker_pb2.DeleteModelRequest(model_id=model_id(data))

    results = await asyncio.gather(
        *[submit_model_task(stub, data) for _ in range(5)],
        stub.DeleteModel(request, metadata=A),
        return_exceptions=True,
    )

    deleted = not isinstance(results[-1], BaseException)
    submitted = [r for r in results[:-1] if not isinstance(r, BaseException)]
    assert deleted != bool(submitted)  # a task of a deleted model can never be queued
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            assert result.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)

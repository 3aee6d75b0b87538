"""A hand-written fake ``Broker`` service for client tests, and a thread adapter.

The fake echoes each task's inputs back as its outputs, so a round trip shows the bytes survive
both directions bit-exact. It holds uploaded models as the broker does (checked with
``modelfile.parse``, keyed by sha256, options updated by a header alone), runs a
``model:<id>`` task as an echo too, and refuses what the real broker refuses with the same
status codes: an unknown model (NOT_FOUND), a GPU type it cannot offer (FAILED_PRECONDITION),
a model over the quota (RESOURCE_EXHAUSTED), a malformed or refused model (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc

from gpubroker.client import AsyncClient, Client, Model, TaskHandle
from gpubroker.protos import broker_pb2, broker_pb2_grpc, modelfile, task_pb2
from gpubroker.protos.convert import params_from_proto, time_to_proto
from tests.support.chunks import iter_chunks

KEY = "key-of-tenant-a"
"""The one API key the fake broker accepts."""
Context = grpc.aio.ServicerContext[Any, Any]
_FINAL = (task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED, task_pb2.TASK_STATE_CANCELLED)
GPU_TYPES = ("cpu", "nvidia-l4", "nvidia-t4")
"""The GPU types the fake can "start"; a task that needs another is FAILED_PRECONDITION."""
MODEL_LOAD_SECONDS = 0.25
"""What the fake reports as a model task's load time."""
WAITING_FOR = "waiting for an nvidia-l4 VM to boot"
"""What the fake reports a ``hold`` task waits for."""


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
        self.headers: list[broker_pb2.TaskHeader] = []
        """Every task header received (Submit, Run and RunMany), in order."""
        self.failure_message = "ValueError: boom"
        """The error message of a ``fail`` task."""
        self.models: dict[str, broker_pb2.ModelInfo] = {}
        """The models held, oldest first."""
        self.model_rpcs: list[str] = []
        """The model RPCs called, in order (``"GetModel"``, ``"UploadModel"``, ...)."""
        self.model_headers: list[broker_pb2.ModelHeader] = []
        """Every UploadModel header received."""
        self.model_bytes_received = 0
        """Model file bytes received over all UploadModel calls."""
        self.model_quota_bytes = 0
        """Largest total of model bytes the tenant may hold; 0 for no quota."""
        self.refuse_models = False
        """Refuse every new model file as the broker refuses one with a forbidden operator."""

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
        self.headers.append(header)
        if header.workload == "refuse":
            return broker_pb2.InlineOutcome(
                index=task.index, error_code="INVALID_ARGUMENT", error_message="refused"
            )
        if (refusal := self._refusal(header)) is not None:
            code, message = refusal
            return broker_pb2.InlineOutcome(
                index=task.index, error_code=code.name, error_message=message
            )
        info = self._new_task(header)
        if info.state == task_pb2.TASK_STATE_FAILED:
            return broker_pb2.InlineOutcome(index=task.index, task=info)
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

    async def UploadModel(
        self, request_iterator: AsyncIterator[broker_pb2.UploadModelRequest], context: Context
    ) -> broker_pb2.UploadModelResponse:
        """Stores a model file, or with a header alone updates a held model's options."""
        # Read it all first, as the broker does, so the client sees the status, not INTERNAL.
        messages = [m async for m in request_iterator]
        await self._authorize(context)
        self.model_rpcs.append("UploadModel")
        header = messages[0].header
        self.model_headers.append(header)
        data = b"".join(m.chunk.data for m in messages[1:])
        self.model_bytes_received += len(data)
        held = self.models.get(header.model_id)
        if held is not None and data:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model held: send no bytes")
        if held is None:
            held = await self._new_model(header, data, context)
        held.name, held.max_batch_size = header.name, header.max_batch_size
        held.max_queue_delay_seconds = header.max_queue_delay_seconds
        held.requires.CopyFrom(header.requires)
        return broker_pb2.UploadModelResponse(model=held, deduplicated=not data)

    async def _new_model(
        self, header: broker_pb2.ModelHeader, data: bytes, context: Context
    ) -> broker_pb2.ModelInfo:
        if len(data) != header.size_bytes:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"header says {header.size_bytes} bytes, {len(data)} arrived",
            )
        try:
            parsed = modelfile.parse(data, expected_id=header.model_id)
        except modelfile.ModelFileError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.refuse_models:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "model refused: node 'load' calls aten::from_file, which models may not call",
            )
        total = sum(m.size_bytes for m in self.models.values()) + len(data)
        if self.model_quota_bytes and total > self.model_quota_bytes:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"models would take {total} bytes, over the quota of {self.model_quota_bytes}",
            )
        info = broker_pb2.ModelInfo(
            model_id=header.model_id,
            size_bytes=len(data),
            created_at=time_to_proto(datetime.now(UTC)),
            inputs=[_spec(s) for s in parsed.metadata["inputs"]],
            outputs=[_spec(s) for s in parsed.metadata["outputs"]],
            batch_dim_varies=parsed.metadata["batch_dim_varies"],
            workload=modelfile.workload_for(header.model_id),
        )
        self.models[header.model_id] = info
        return info

    async def GetModel(
        self, request: broker_pb2.GetModelRequest, context: Context
    ) -> broker_pb2.GetModelResponse:
        """One held model; NOT_FOUND for another id."""
        return broker_pb2.GetModelResponse(model=await self._model(request.model_id, context))

    async def ListModels(
        self, request: broker_pb2.ListModelsRequest, context: Context
    ) -> broker_pb2.ListModelsResponse:
        """The held models, newest first."""
        await self._authorize(context)
        self.model_rpcs.append("ListModels")
        models = list(reversed(self.models.values()))
        return broker_pb2.ListModelsResponse(
            models=models,
            total_bytes=sum(m.size_bytes for m in models),
            quota_bytes=self.model_quota_bytes,
        )

    async def DeleteModel(
        self, request: broker_pb2.DeleteModelRequest, context: Context
    ) -> broker_pb2.DeleteModelResponse:
        """Forgets a held model; NOT_FOUND for another id."""
        model = await self._model(request.model_id, context, rpc="DeleteModel")
        del self.models[request.model_id]
        return broker_pb2.DeleteModelResponse(model=model)

    async def GetStatus(
        self, request: broker_pb2.GetStatusRequest, context: Context
    ) -> broker_pb2.GetStatusResponse:
        """The client SDK does not call it; the real broker's is tested in tests/broker."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the fake broker has no status")
        raise AssertionError("abort returned")

    async def _model(
        self, model_id: str, context: Context, rpc: str = "GetModel"
    ) -> broker_pb2.ModelInfo:
        await self._authorize(context)
        self.model_rpcs.append(rpc)
        if model_id not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {model_id!r}")
        return self.models[model_id]

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
        self.headers.append(header)
        self.time_remaining.append(context.time_remaining())
        if (refusal := self._refusal(header)) is not None:
            await context.abort(*refusal)
        known = [t for t in self.tasks.values() if t.request_id == header.request_id]
        if known:
            return known[0], True
        info = self._new_task(header)
        info.request_id = header.request_id
        if header.workload == "hold":
            info.state, info.waiting_for = task_pb2.TASK_STATE_QUEUED, WAITING_FOR
            del info.outputs[:]
        self.tasks[info.task_id] = info
        self.payloads[info.task_id] = b"".join(m.chunk.data for m in messages[1:])
        self.params[info.task_id] = params_from_proto(header.params)
        return info, False

    def _refusal(self, header: broker_pb2.TaskHeader) -> tuple[grpc.StatusCode, str] | None:
        """Why the broker would refuse the task, as its status code and message; else None."""
        model_id = modelfile.model_of(header.workload)
        if model_id is not None and model_id not in self.models:
            return grpc.StatusCode.NOT_FOUND, f"no model {model_id}"
        gpu_type = self._requirement(header).gpu_type
        if gpu_type and gpu_type not in GPU_TYPES:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no GPU type the broker can start or reach is {gpu_type!r}",
            )
        return None

    def _requirement(self, header: broker_pb2.TaskHeader) -> task_pb2.GpuRequirement:
        if header.HasField("requires"):
            return header.requires
        model_id = modelfile.model_of(header.workload)
        return self.models[model_id].requires if model_id else task_pb2.GpuRequirement()

    def _new_task(self, header: broker_pb2.TaskHeader) -> task_pb2.TaskInfo:
        """A task that failed (workload ``fail``) or succeeded with its inputs as outputs."""
        info = task_pb2.TaskInfo(task_id=uuid.uuid4().hex, workload=header.workload)
        info.inputs.extend(header.inputs)
        info.requires.CopyFrom(self._requirement(header))
        if header.workload == "fail":
            info.state, info.error_code = task_pb2.TASK_STATE_FAILED, "ABORTED"
            info.error_message = self.failure_message
            return info
        info.state = task_pb2.TASK_STATE_SUCCEEDED
        info.outputs.extend(header.inputs)
        if modelfile.model_of(header.workload):
            info.model_load_seconds, info.batch_tasks = MODEL_LOAD_SECONDS, 1
        return info

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


def _spec(spec: dict[str, Any]) -> task_pb2.TensorSpec:
    """A model file's tensor spec on the wire: -1 for a varying batch dimension."""
    shape = [-1 if d is None else d for d in spec["shape"]]
    return task_pb2.TensorSpec(dtype=spec["dtype"], shape=shape)


class InThread:
    """Gives a blocking ``Client`` or ``TaskHandle`` the async surface: calls run in a thread."""

    def __init__(self, target: Client | TaskHandle) -> None:
        self.wrapped = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.wrapped, name)
        if name == "task":  # no I/O, and not a coroutine on AsyncClient either
            return lambda *args, **kwargs: InThread(attr(*args, **kwargs))
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            value = await asyncio.to_thread(attr, *args, **kwargs)
            return InThread(value) if isinstance(value, TaskHandle) else value

        return call


async def run_map(client: Any, workload: str | Model, items: list[Any], **kwargs: Any) -> list[Any]:
    """Runs ``map`` to the end with either client flavour (an ``AsyncClient`` or ``InThread``)."""
    if isinstance(client, AsyncClient):
        return [r async for r in client.map(workload, items, **kwargs)]
    sync = client.wrapped
    return await asyncio.to_thread(lambda: list(sync.map(workload, items, **kwargs)))

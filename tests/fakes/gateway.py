"""A hand-written fake ``AgentGateway`` (the broker's side of the agent protocol).

Agent tests run the real ``Agent`` against it on a loopback port; it can be stopped and
started again to play a broker restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from gpubroker.client.codec import decode, encode
from gpubroker.gpu_agent.agent import Agent
from gpubroker.gpu_agent.workloads import Param
from gpubroker.protos import agent_pb2, agent_pb2_grpc, task_pb2
from gpubroker.protos.transport import RETRY_AFTER_HEADER
from gpubroker.protos.wire import TensorMeta
from tests.support.chunks import iter_chunks

Context = grpc.aio.ServicerContext[Any, Any]
TOKEN = "s3cret"
"""The join token the fake gateway expects agents to present."""
WAIT_S = 10.0
"""How long a test waits for any one thing the agent should do."""

AgentFactory = Callable[..., Agent]
"""Starts an ``Agent`` connected to the fake gateway (the ``start_agent`` fixture)."""


@dataclass
class Upload:
    """One result (a PutResult call or a control-stream result) as the fake broker saw it."""

    header: agent_pb2.ResultHeader
    data: bytes


@dataclass
class FakeGateway(agent_pb2_grpc.AgentGatewayServicer):
    """Welcomes agents, assigns queued tasks against their credit, serves inputs, keeps results."""

    heartbeat_s: float = 0.05
    refuse_results: grpc.StatusCode | None = None
    retry_after: str | None = None
    """Sent with each refused result as ``RETRY_AFTER_HEADER``, as the broker with a full disk."""
    result_calls: int = 0
    messages: asyncio.Queue[agent_pb2.AgentMessage] = field(default_factory=asyncio.Queue)
    uploads: asyncio.Queue[Upload] = field(default_factory=asyncio.Queue)
    fetched: list[str] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    _queued: list[agent_pb2.TaskAssignment] = field(default_factory=list)
    _inputs: dict[str, bytes] = field(default_factory=dict)
    _outbox: asyncio.Queue[agent_pb2.BrokerMessage | None] | None = None
    _credit: int = 0

    def submit(self, assignment: agent_pb2.TaskAssignment, data: bytes = b"") -> None:
        self._queued.append(assignment)
        self._inputs[assignment.task_id] = data
        self._dispatch()

    def cancel(self, task_id: str, attempt: int) -> None:
        assert self._outbox is not None
        ref = agent_pb2.TaskAttempt(task_id=task_id, attempt=attempt)
        self._outbox.put_nowait(
            agent_pb2.BrokerMessage(cancel=agent_pb2.TaskCancel(attempt=ref, reason="test"))
        )

    def _dispatch(self) -> None:
        while self._outbox is not None and self._credit > 0 and self._queued:
            self._credit -= 1
            self._outbox.put_nowait(agent_pb2.BrokerMessage(assignment=self._queued.pop(0)))

    async def Connect(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: Context
    ) -> AsyncIterator[agent_pb2.BrokerMessage]:
        self.metadata.append(dict(context.invocation_metadata() or ()))  # type: ignore[arg-type]
        messages = aiter(request_iterator)
        hello = await anext(messages)
        self.messages.put_nowait(hello)
        outbox = self._outbox = asyncio.Queue()
        self._credit = 0
        reader = asyncio.create_task(self._read(messages, outbox))
        try:
            welcome = agent_pb2.AgentWelcome(
                agent_id=hello.hello.agent_id, heartbeat_interval_seconds=self.heartbeat_s
            )
            yield agent_pb2.BrokerMessage(welcome=welcome)
            while (message := await outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()

    async def _read(
        self,
        messages: AsyncIterator[agent_pb2.AgentMessage],
        outbox: asyncio.Queue[agent_pb2.BrokerMessage | None],
    ) -> None:
        async for received in messages:
            batch = received.batch.messages if received.HasField("batch") else [received]
            for message in batch:
                self.messages.put_nowait(message)
                if message.HasField("result"):  # a small result, on the control stream
                    self.uploads.put_nowait(Upload(message.result.header, message.result.data))
                self._credit += message.credit.slots
            self._dispatch()
        outbox.put_nowait(None)  # the agent half-closed: end the stream, as the broker does

    async def FetchInputs(
        self, request: agent_pb2.FetchInputsRequest, context: Context
    ) -> AsyncIterator[agent_pb2.FetchInputsResponse]:
        self.fetched.append(request.attempt.task_id)
        for chunk in iter_chunks([self._inputs[request.attempt.task_id]], chunk_bytes=100):
            yield agent_pb2.FetchInputsResponse(chunk=task_pb2.DataChunk(data=chunk))

    async def PutResult(
        self, request_iterator: AsyncIterator[agent_pb2.PutResultRequest], context: Context
    ) -> agent_pb2.PutResultResponse:
        requests = [r async for r in request_iterator]
        self.result_calls += 1
        if self.refuse_results is not None:
            if self.retry_after is not None:
                context.set_trailing_metadata(((RETRY_AFTER_HEADER, self.retry_after),))
            await context.abort(self.refuse_results, "attempt 1 is no longer current")
        self.uploads.put_nowait(
            Upload(requests[0].header, b"".join(r.chunk.data for r in requests))
        )
        return agent_pb2.PutResultResponse(state=task_pb2.TASK_STATE_SUCCEEDED)


@dataclass
class FakeGatewayServer:
    """A fake gateway served on a loopback port that can be stopped and started again."""

    gateway: FakeGateway
    port: int = 0
    server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.server = grpc.aio.server()
        agent_pb2_grpc.add_AgentGatewayServicer_to_server(self.gateway, self.server)
        self.port = self.server.add_insecure_port(f"localhost:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)


def make_assignment(
    task_id: str,
    workload: str,
    inputs: Sequence[torch.Tensor] = (),
    attempt: int = 1,
    timeout_s: float = 0.0,
    params: Mapping[str, Param] | None = None,
) -> tuple[agent_pb2.TaskAssignment, bytes]:
    """An assignment of ``inputs`` to ``workload`` and the input bytes the gateway serves."""
    encoded = [encode(t, name=f"in{i}") for i, t in enumerate(inputs)]
    headers = [_header(meta) for meta, _ in encoded]
    message = agent_pb2.TaskAssignment(
        task_id=task_id,
        attempt=attempt,
        workload=workload,
        inputs=headers,
        params={k: _param(v) for k, v in (params or {}).items()},
        timeout_seconds=timeout_s,
    )
    return message, b"".join(iter_chunks([data for _, data in encoded]))


def _header(meta: TensorMeta) -> task_pb2.TensorHeader:
    return task_pb2.TensorHeader(
        name=meta.name, dtype=meta.dtype, shape=meta.shape, nbytes=meta.nbytes, crc32c=meta.crc32c
    )


def _param(value: Param) -> task_pb2.ParamValue:
    if isinstance(value, bool):
        return task_pb2.ParamValue(bool_value=value)
    if isinstance(value, int):
        return task_pb2.ParamValue(int_value=value)
    if isinstance(value, float):
        return task_pb2.ParamValue(float_value=value)
    return task_pb2.ParamValue(string_value=value)


def outputs(upload: Upload) -> list[torch.Tensor]:
    """The tensors of an uploaded result, checked to use every byte."""
    tensors, offset = [], 0
    for header in upload.header.outputs:
        meta = TensorMeta(header.dtype, tuple(header.shape), header.nbytes, header.crc32c)
        buffer = bytearray(upload.data[offset : offset + meta.nbytes])
        offset += meta.nbytes
        tensor = decode(meta, buffer, "torch")
        assert isinstance(tensor, torch.Tensor)
        tensors.append(tensor)
    assert offset == len(upload.data)
    return tensors


async def next_message(gateway: FakeGateway, kind: str) -> agent_pb2.AgentMessage:
    """The next control message of ``kind``; others (heartbeats, mostly) are skipped."""
    async with asyncio.timeout(WAIT_S):
        while (message := await gateway.messages.get()).WhichOneof("kind") != kind:
            pass
    return message


def received_kinds(gateway: FakeGateway) -> list[str | None]:
    """The kinds of the control messages received and not yet looked at."""
    kinds: list[str | None] = []
    while not gateway.messages.empty():
        kinds.append(gateway.messages.get_nowait().WhichOneof("kind"))
    return kinds


async def next_upload(gateway: FakeGateway) -> Upload:
    """The next result the gateway received, waiting at most ``WAIT_S``."""
    return await asyncio.wait_for(gateway.uploads.get(), WAIT_S)

"""The agent's client of the broker's ``AgentGateway`` service: the channel and the data calls.

Large task data moves on per-attempt calls (``FetchInputs``, ``PutResult``), separate from the
control stream, so one large tensor never holds up another task's control messages. Small
inputs ride in the assignment and small results on the control stream (``INLINE_MAX_BYTES``):
for a tiny task a second RPC would cost more than the task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import torch

from gpubroker.client.codec import decode, empty_buffer
from gpubroker.gpu_agent.config import Settings
from gpubroker.gpu_agent.convert import ref_to_proto
from gpubroker.gpu_agent.model import Assignment, AttemptRef
from gpubroker.gpu_agent.runner import RunOutcome
from gpubroker.protos import agent_pb2, agent_pb2_grpc, task_pb2
from gpubroker.protos.convert import meta_to_proto
from gpubroker.protos.frames import chunk_data, chunk_messages, method_options
from gpubroker.protos.states import FailureCode
from gpubroker.protos.transport import AGENT_CHANNEL_OPTIONS, bearer_metadata, client_credentials
from gpubroker.protos.wire import Assembler, Buffer, TensorMeta

__all__ = ["GatewayClient", "open_channel"]

_METHODS = agent_pb2.DESCRIPTOR.services_by_name["AgentGateway"].methods_by_name

ControlCall = grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.BrokerMessage]


def open_channel(settings: Settings) -> grpc.aio.Channel:
    """A channel to the broker, over TLS when ``settings.tls``, presenting ``cert_file`` when set.

    The CA, certificate and key files are read here, once, at start-up, before any task runs.
    """
    address, options = settings.broker_address, AGENT_CHANNEL_OPTIONS
    if not settings.tls:
        return grpc.aio.insecure_channel(address, options=options)
    # An empty path (``--ca-file ""``) means none, as when the flag is left out.
    credentials = client_credentials(
        settings.ca_file or None, settings.cert_file or None, settings.key_file or None
    )
    return grpc.aio.secure_channel(address, credentials, options=options)


class GatewayClient:
    """Calls the broker for one agent, with its join token on every call."""

    def __init__(self, channel: grpc.aio.Channel, agent_id: str, join_token: str | None) -> None:
        self._stub = agent_pb2_grpc.AgentGatewayStub(channel)
        # The data calls, with tensor chunks framed without protobuf (gpubroker.protos.frames).
        self._fetch_inputs = channel.unary_stream(*method_options(_METHODS["FetchInputs"]))
        self._put_result = channel.stream_unary(*method_options(_METHODS["PutResult"]))
        self._agent_id = agent_id
        self._metadata = bearer_metadata(join_token)

    def connect(self, messages: AsyncIterator[agent_pb2.AgentMessage]) -> ControlCall:
        """Opens the control stream, sending ``messages``."""
        return self._stub.Connect(messages, metadata=self._metadata)

    async def fetch_inputs(self, assignment: Assignment) -> list[torch.Tensor]:
        """The assignment's input tensors, checked against their sizes and checksums.

        Raises:
            gpubroker.protos.wire.WireError: a header is malformed or the bytes do not match it.
            grpc.aio.AioRpcError: the broker refused (e.g. a stale attempt) or is gone.
        """
        for meta in assignment.inputs:
            meta.validate()
        assembler = Assembler(assignment.inputs, empty_buffer)
        if assignment.inline_inputs is not None:
            assembler.feed(assignment.inline_inputs)
        else:
            request = agent_pb2.FetchInputsRequest(
                agent_id=self._agent_id, attempt=ref_to_proto(assignment.ref)
            )
            async for reply in self._fetch_inputs(request, metadata=self._metadata):
                assembler.feed(chunk_data(reply))
        buffers = assembler.finish()
        return [
            _decode(meta, buffer) for meta, buffer in zip(assignment.inputs, buffers, strict=True)
        ]

    async def fetch_model(self, ref: AttemptRef, model_id: str) -> AsyncIterator[bytes]:
        """The bytes of model ``model_id``, for attempt ``ref`` whose task runs it.

        Raises:
            grpc.aio.AioRpcError: the broker refused (a stale attempt, an unknown model) or is
                gone.
        """
        request = agent_pb2.FetchModelRequest(
            agent_id=self._agent_id, attempt=ref_to_proto(ref), model_id=model_id
        )
        call = self._stub.FetchModel(request, metadata=self._metadata)
        try:
            async for reply in call:
                yield reply.chunk.data
        finally:
            call.cancel()  # a consumer that stops early (a size check) ends the stream

    def result_header(
        self, ref: AttemptRef, outcome: RunOutcome, metas: Sequence[TensorMeta]
    ) -> agent_pb2.ResultHeader:
        """The header reporting a successful attempt with outputs ``metas``."""
        return agent_pb2.ResultHeader(
            agent_id=self._agent_id,
            attempt=ref_to_proto(ref),
            outputs=[meta_to_proto(meta) for meta in metas],
            compute_seconds=outcome.compute_seconds,
            model_load_seconds=outcome.model_load_seconds,
            batch_tasks=outcome.batch_tasks,
        )

    def failure_header(
        self, ref: AttemptRef, code: FailureCode, message: str
    ) -> agent_pb2.ResultHeader:
        """The header reporting a failed attempt: ``error_code`` and no outputs."""
        return agent_pb2.ResultHeader(
            agent_id=self._agent_id,
            attempt=ref_to_proto(ref),
            error_code=code.value,
            error_message=message,
        )

    async def put_result(
        self, header: agent_pb2.ResultHeader, buffers: Sequence[memoryview] = ()
    ) -> task_pb2.TaskState.ValueType:
        """Uploads an attempt's outcome with its output bytes; returns the task's new state."""
        requests = _result_requests(header, buffers)
        reply: agent_pb2.PutResultResponse = await self._put_result(
            requests, metadata=self._metadata
        )
        return reply.state


def _decode(meta: TensorMeta, buffer: Buffer) -> torch.Tensor:
    tensor = decode(meta, buffer, "torch")
    assert isinstance(tensor, torch.Tensor)  # decode returns torch for kind "torch"
    return tensor


def _result_requests(
    header: agent_pb2.ResultHeader, buffers: Sequence[memoryview]
) -> Iterator[agent_pb2.PutResultRequest | bytes]:
    # A generator, so only one ~1 MiB chunk is copied out of the outputs at a time.
    yield agent_pb2.PutResultRequest(header=header)
    yield from chunk_messages(agent_pb2.PutResultRequest, buffers)

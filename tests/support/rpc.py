"""Talking to a broker through the raw generated stubs, as a client in another language would.

One place for the API-key metadata (``bearer``, ``AUTH``), the Submit stream
(``submit_requests``), a one-tensor submit (``submit``) and the status a call ended with
(``status_code``).
"""

from __future__ import annotations

import grpc

from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.wire import crc32c

Metadata = tuple[tuple[str, str], ...]
"""gRPC call metadata."""


def bearer(key: str) -> Metadata:
    """The metadata that presents API key (or join token) ``key``."""
    return (("authorization", f"Bearer {key}"),)


AUTH = bearer("key-a")
"""Tenant ``tenant-a``'s key on the test brokers (``cluster.API_KEYS``)."""


def uint8_header(data: bytes) -> task_pb2.TensorHeader:
    """The header of a 1-d ``uint8`` tensor holding ``data``."""
    return task_pb2.TensorHeader(
        dtype="uint8", shape=[len(data)], nbytes=len(data), crc32c=crc32c(data)
    )


def submit_requests(
    header: broker_pb2.TaskHeader, chunks: list[bytes]
) -> list[broker_pb2.SubmitRequest]:
    """A Submit stream: the header, then one message per chunk."""
    messages = [broker_pb2.SubmitRequest(header=header)]
    messages += [broker_pb2.SubmitRequest(chunk=task_pb2.DataChunk(data=c)) for c in chunks]
    return messages


async def submit(
    target: grpc.aio.Channel | broker_pb2_grpc.BrokerAsyncStub,
    data: bytes,
    key: str = "key-a",
    workload: str = "echo",
) -> str:
    """Submits one ``uint8`` tensor of ``data`` to ``workload`` with ``key``; the task id."""
    stub = broker_pb2_grpc.BrokerStub(target) if isinstance(target, grpc.aio.Channel) else target
    header = broker_pb2.TaskHeader(workload=workload, inputs=[uint8_header(data)])
    reply = await stub.Submit(iter(submit_requests(header, [data])), metadata=bearer(key))
    return str(reply.task_id)


async def status_code(call: object) -> grpc.StatusCode:
    """The status code an awaitable call or a response stream ends with."""
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall):
            async for _ in call:
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK

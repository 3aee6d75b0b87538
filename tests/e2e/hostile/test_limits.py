"""Streams and connections that try to hold the broker are cut, refused or closed.

Each test runs a broker in this event loop with small limits (``StreamLimits``) and talks to
it over real gRPC on loopback: stalled and dribbling uploads on every client-streaming RPC,
idle and old connections, streams per connection and per tenant, oversize metadata, garbage
and truncated messages, and a stream that declares gigabytes and sends nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpubroker.broker.config import StreamLimits
from gpubroker.broker.server import BrokerServer
from gpubroker.protos import agent_pb2, agent_pb2_grpc, broker_pb2, broker_pb2_grpc, task_pb2
from tests.support.cluster import broker_settings, running_broker
from tests.support.rpc import AUTH, bearer, submit, uint8_header
from tests.support.waiting import wait_for, wait_for_async

IDLE_S = 0.6
"""The test brokers' upload idle timeout."""

LIMITS = StreamLimits(
    upload_idle_timeout_s=IDLE_S,
    upload_min_rate_bytes_per_s=8 << 10,
    upload_rate_window_s=1.0,
    max_calls_per_tenant=3,
)

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}

OK = grpc.StatusCode.OK

Send = Callable[[broker_pb2_grpc.BrokerStub, agent_pb2_grpc.AgentGatewayStub, Any], Awaitable[Any]]


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[BrokerServer]:
    settings = broker_settings(tmp_path, api_keys=KEYS, streams=LIMITS)
    async with running_broker(settings) as server:
        yield server


@pytest.fixture
async def channel(broker: BrokerServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
        yield channel


def _header(nbytes: int) -> broker_pb2.TaskHeader:
    tensor = task_pb2.TensorHeader(dtype="uint8", shape=[nbytes], nbytes=nbytes)
    return broker_pb2.TaskHeader(workload="echo", inputs=[tensor])


async def _then_stall(*messages: Any) -> AsyncIterator[Any]:
    for message in messages:
        yield message
    await asyncio.sleep(3600)


async def _dribble(first: Any, chunk: Callable[[bytes], Any]) -> AsyncIterator[Any]:
    yield first
    while True:
        yield chunk(b"x" * 64)
        await asyncio.sleep(0.05)


async def _code_and_details(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        if isinstance(call, grpc.aio.StreamStreamCall):
            while await call.read() is not grpc.aio.EOF:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


UPLOADS: dict[str, Callable[[grpc.aio.Channel, AsyncIterator[Any]], Any]] = {
    "Submit": lambda ch, r: broker_pb2_grpc.BrokerStub(ch).Submit(r, metadata=AUTH, timeout=30),
    "Run": lambda ch, r: broker_pb2_grpc.BrokerStub(ch).Run(r, metadata=AUTH, timeout=30),
    "RunMany": lambda ch, r: broker_pb2_grpc.BrokerStub(ch).RunMany(r, metadata=AUTH, timeout=30),
    "UploadModel": lambda ch, r: broker_pb2_grpc.BrokerStub(ch).UploadModel(
        r, metadata=AUTH, timeout=30
    ),
    "PutResult": lambda ch, r: agent_pb2_grpc.AgentGatewayStub(ch).PutResult(r, timeout=30),
}


@pytest.mark.parametrize("rpc", sorted(UPLOADS))
async def test_an_upload_that_sends_nothing_is_cut_after_the_idle_timeout(
    channel: grpc.aio.Channel, rpc: str
) -> None:
    started = time.monotonic()

    code, details = await _code_and_details(UPLOADS[rpc](channel, _then_stall()))

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == f"upload stalled: no message for {IDLE_S:g} s"
    assert IDLE_S <= time.monotonic() - started < IDLE_S + 5


STALLED_AFTER_HEADER: dict[str, Any] = {
    "Submit": broker_pb2.SubmitRequest(header=_header(1 << 20)),
    "Run": broker_pb2.RunRequest(header=_header(1 << 20)),
    "UploadModel": broker_pb2.UploadModelRequest(
        header=broker_pb2.ModelHeader(model_id="a" * 64, size_bytes=1 << 20, name="m")
    ),
}


@pytest.mark.parametrize("rpc", sorted(STALLED_AFTER_HEADER))
async def test_an_upload_that_stalls_after_its_header_is_cut(
    channel: grpc.aio.Channel, rpc: str
) -> None:
    requests = _then_stall(STALLED_AFTER_HEADER[rpc])

    code, details = await _code_and_details(UPLOADS[rpc](channel, requests))

    assert (code, details) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"upload stalled: no message for {IDLE_S:g} s",
    )


DRIBBLES: dict[str, tuple[Any, Callable[[bytes], Any]]] = {
    "Submit": (
        broker_pb2.SubmitRequest(header=_header(1 << 20)),
        lambda d: broker_pb2.SubmitRequest(chunk=task_pb2.DataChunk(data=d)),
    ),
    "Run": (
        broker_pb2.RunRequest(header=_header(1 << 20)),
        lambda d: broker_pb2.RunRequest(chunk=task_pb2.DataChunk(data=d)),
    ),
    "UploadModel": (
        STALLED_AFTER_HEADER["UploadModel"],
        lambda d: broker_pb2.UploadModelRequest(chunk=task_pb2.DataChunk(data=d)),
    ),
}


@pytest.mark.parametrize("rpc", sorted(DRIBBLES))
async def test_an_upload_slower_than_the_minimum_rate_is_cut(
    channel: grpc.aio.Channel, rpc: str
) -> None:
    first, chunk = DRIBBLES[rpc]

    code, details = await _code_and_details(UPLOADS[rpc](channel, _dribble(first, chunk)))

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("upload slower than 8 KiB/s: ")


async def test_a_dribbling_result_upload_is_cut(channel: grpc.aio.Channel) -> None:
    header = agent_pb2.PutResultRequest(header=agent_pb2.ResultHeader(agent_id="nobody"))
    requests = _dribble(
        header, lambda d: agent_pb2.PutResultRequest(chunk=task_pb2.DataChunk(data=d))
    )

    code, _ = await _code_and_details(UPLOADS["PutResult"](channel, requests))

    # Refused at once (no such lease) or cut for its rate: never held for its whole dribble.
    assert code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_a_map_call_waiting_for_its_outcomes_is_not_cut(channel: grpc.aio.Channel) -> None:
    # No agent: the task stays queued, and the client rightly sends nothing while it waits.
    header = broker_pb2.TaskHeader(workload="echo", inputs=[uint8_header(b"x")])
    task = broker_pb2.InlineTask(index=0, header=header, data=b"x")
    call = UPLOADS["RunMany"](channel, _then_stall(broker_pb2.RunManyRequest(tasks=[task])))

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(call.read()), timeout=4 * IDLE_S)

    call.cancel()


async def test_a_declared_size_reserves_no_memory_before_its_bytes_arrive(tmp_path: Path) -> None:
    declared = 3 << 30
    settings = broker_settings(
        tmp_path,
        api_keys=KEYS,
        streams=dataclasses.replace(LIMITS, upload_idle_timeout_s=1.5),
        spool_memory_bytes=4 << 30,
        limits=dataclasses.replace(broker_settings(tmp_path).limits, max_task_bytes=declared),
    )
    async with (
        running_broker(settings) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        header = broker_pb2.RunRequest(header=_header(declared))
        stalled = asyncio.ensure_future(
            _code_and_details(UPLOADS["Run"](channel, _then_stall(header)))
        )
        held = []
        while not stalled.done():
            held.append(server.spool.held_bytes)
            await asyncio.sleep(0.01)
        one_chunk = broker_pb2.RunRequest(chunk=task_pb2.DataChunk(data=b"x" * 4096))
        started = asyncio.ensure_future(
            _code_and_details(UPLOADS["Run"](channel, _then_stall(header, one_chunk)))
        )
        await wait_for(lambda: server.spool.held_bytes == declared, 10, "the first bytes' room")
        code, _ = await started

    assert stalled.result()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(held) > 10 and set(held) == {0}
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.spool.held_bytes == 0  # the cut call gave its room back


async def test_a_tenant_past_its_calls_in_flight_is_refused_and_others_are_not(
    channel: grpc.aio.Channel,
) -> None:
    stub = broker_pb2_grpc.BrokerStub(channel)
    task_id = await submit(channel, b"x")
    get = broker_pb2.GetTaskRequest(task_id=task_id)
    watch = broker_pb2.WatchTaskRequest(task_id=task_id)
    watches = [stub.WatchTask(watch, metadata=AUTH) for _ in range(LIMITS.max_calls_per_tenant)]
    for call in watches:
        await call.read()

    refused = await _code_and_details(stub.GetTask(get, metadata=AUTH))
    other = await _code_and_details(
        stub.ListTasks(broker_pb2.ListTasksRequest(), metadata=bearer("key-b"))
    )
    watches[0].cancel()

    async def served_again() -> bool:
        return (await _code_and_details(stub.GetTask(get, metadata=AUTH)))[0] == OK

    await wait_for_async(served_again, 5, "a place freed by the cancelled watch")
    for call in watches[1:]:
        call.cancel()
    assert refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_calls_per_tenant 3" in refused[1]
    assert other[0] == OK

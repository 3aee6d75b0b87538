"""Connections and messages that try to hold the broker: idle, old or crowded connections,
oversize metadata, garbage and truncated messages. Real gRPC on loopback, small limits."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpubroker.broker.config import StreamLimits
from gpubroker.broker.server import BrokerServer
from gpubroker.protos import broker_pb2, broker_pb2_grpc
from tests.support.cluster import broker_settings, running_broker
from tests.support.rpc import AUTH, submit
from tests.support.waiting import wait_for

KEYS = {"key-a": "tenant-a"}

GARBAGE = b"\xff\xff\xff\xff\x0f not a protobuf"


async def _broker(tmp_path: Path, **limits: Any) -> Any:
    streams = dataclasses.replace(StreamLimits(), **limits)
    return running_broker(broker_settings(tmp_path, api_keys=KEYS, streams=streams))


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[BrokerServer]:
    async with await _broker(tmp_path, max_streams_per_connection=2) as server:
        yield server


def _address(broker: BrokerServer) -> str:
    return f"127.0.0.1:{broker.port}"


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall):
            while await call.read() is not grpc.aio.EOF:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("kind", "method"),
    [
        ("unary_unary", "/gpubroker.v1.Broker/GetTask"),
        ("unary_stream", "/gpubroker.v1.Broker/WatchTask"),
        ("stream_unary", "/gpubroker.v1.Broker/Submit"),
        ("stream_stream", "/gpubroker.v1.Broker/RunMany"),
        ("stream_unary", "/gpubroker.v1.AgentGateway/PutResult"),
        ("unary_unary", "/grpc.health.v1.Health/Check"),
    ],
)
async def test_a_garbage_message_answers_invalid_argument_and_logs_no_traceback(
    broker: BrokerServer, caplog: pytest.LogCaptureFixture, kind: str, method: str
) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(_address(broker)) as channel:
        # No serializer: the bytes go out exactly as given.
        rpc = getattr(channel, kind)(method)
        request = GARBAGE if kind.startswith("unary") else iter([GARBAGE])

        code, details = await _code(rpc(request, metadata=AUTH, timeout=10))

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == f"a request message of {method} is not a valid protobuf message"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, no Huffman (both under 127 bytes)."""
    return bytes([0, len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def _read_frames(sock: socket.socket, until: float) -> tuple[list[tuple[int, int, int]], bool]:
    """(type, flags, stream) of each frame read until stream 1 is answered, the connection
    closes or time runs out; and whether the connection closed."""
    frames: list[tuple[int, int, int]] = []
    buffer, deadline = b"", time.monotonic() + until
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            return frames, True
        buffer += data
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, flags = buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            frames.append((kind, flags, stream))
            buffer = buffer[9 + length :]
        if any(s == 1 and (k == 3 or (k == 1 and f & 1)) for k, f, s in frames):
            break
    return frames, False


def _truncated_call(port: int) -> tuple[list[tuple[int, int, int]], bool]:
    headers = b"".join(
        _literal(name, value)
        for name, value in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/gpubroker.v1.Broker/GetTask"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    # A gRPC message that declares 100 bytes, then 10 bytes and the end of the stream.
    message = b"\x00" + struct.pack(">I", 100) + b"0123456789"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(4, 0, 0, b"")
            + _frame(1, 4, 1, headers)
            + headers
            + _frame(0, 1, 1, message)
            + message
        )
        return _read_frames(sock, 10.0)


async def test_a_truncated_message_is_answered_by_the_end_of_its_connection(
    tmp_path: Path,
) -> None:
    # gRPC's core never answers a call whose last message is cut short: what ends it is the
    # connection's age and grace (unbounded grace by default, for agents' control streams).
    limits = {"connection_max_age_s": 0.5, "connection_age_grace_s": 0.5}
    async with await _broker(tmp_path, **limits) as server:
        frames, closed = await asyncio.to_thread(_truncated_call, server.port)

    # GOAWAY (7) and the connection's end, or trailers / RST_STREAM on the call's stream.
    answered = any(s == 1 and (k == 3 or (k == 1 and f & 1)) for k, f, s in frames)
    assert answered or (closed and any(k == 7 for k, _, _ in frames)), frames


async def test_ten_thousand_metadata_entries_are_refused(broker: BrokerServer) -> None:
    metadata = AUTH + tuple((f"x-entry-{i}", "v") for i in range(10_000))
    async with grpc.aio.insecure_channel(_address(broker)) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        request = broker_pb2.ListTasksRequest()

        refused, _ = await _code(stub.ListTasks(request, metadata=metadata, timeout=10))
        served, _ = await _code(stub.ListTasks(request, metadata=AUTH, timeout=10))

    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served == grpc.StatusCode.OK


async def test_a_connection_holds_at_most_its_streams_and_another_is_served(
    broker: BrokerServer,
) -> None:
    own = [("grpc.use_local_subchannel_pool", 1)]  # else both channels share one connection
    async with (
        grpc.aio.insecure_channel(_address(broker), own) as crowded,
        grpc.aio.insecure_channel(_address(broker), own) as other,
    ):
        task_id = await submit(other, b"x")
        stub = broker_pb2_grpc.BrokerStub(crowded)
        watch = broker_pb2.WatchTaskRequest(task_id=task_id)
        watches = [stub.WatchTask(watch, metadata=AUTH) for _ in range(2)]
        for call in watches:
            await call.read()
        get = broker_pb2.GetTaskRequest(task_id=task_id)

        # The third stream waits for one of the two (the client queues it): it times out.
        crowded_code, _ = await _code(stub.GetTask(get, metadata=AUTH, timeout=1.0))
        other_code, _ = await _code(
            broker_pb2_grpc.BrokerStub(other).GetTask(get, metadata=AUTH, timeout=5.0)
        )
        for call in watches:
            call.cancel()

    assert crowded_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert other_code == grpc.StatusCode.OK


async def test_an_idle_connection_is_closed(tmp_path: Path) -> None:
    async with (
        await _broker(tmp_path, connection_idle_s=0.5) as server,
        grpc.aio.insecure_channel(_address(server)) as channel,
    ):
        await submit(channel, b"x")
        assert channel.get_state() == grpc.ChannelConnectivity.READY

        await wait_for(
            lambda: channel.get_state() == grpc.ChannelConnectivity.IDLE,
            10,
            "the broker to close the idle connection",
        )

        await submit(channel, b"y")  # and the next call simply reconnects


async def test_an_old_connection_lets_its_running_call_finish_within_the_grace(
    tmp_path: Path,
) -> None:
    async with (
        await _broker(tmp_path, connection_max_age_s=0.5, connection_age_grace_s=30.0) as server,
        grpc.aio.insecure_channel(_address(server)) as channel,
    ):
        stub = broker_pb2_grpc.BrokerStub(channel)
        task_id = await submit(channel, b"x")
        watch = stub.WatchTask(broker_pb2.WatchTaskRequest(task_id=task_id), metadata=AUTH)
        await watch.read()
        await wait_for(
            lambda: channel.get_state() != grpc.ChannelConnectivity.READY,
            10,
            "the broker to ask the old connection to go away",
        )

        fresh = await submit(channel, b"y")  # a new call goes over a new connection
        await stub.CancelTask(broker_pb2.CancelTaskRequest(task_id=task_id), metadata=AUTH)
        code, _ = await _code(watch)  # the running watch was left to finish

    assert fresh
    assert code == grpc.StatusCode.OK


async def test_an_old_connection_past_its_grace_is_closed(tmp_path: Path) -> None:
    async with (
        await _broker(tmp_path, connection_max_age_s=0.5, connection_age_grace_s=0.5) as server,
        grpc.aio.insecure_channel(_address(server)) as channel,
    ):
        task_id = await submit(channel, b"x")
        request = broker_pb2.WatchTaskRequest(task_id=task_id)
        watch = broker_pb2_grpc.BrokerStub(channel).WatchTask(request, metadata=AUTH, timeout=20)

        code, _ = await _code(watch)

    assert code == grpc.StatusCode.UNAVAILABLE

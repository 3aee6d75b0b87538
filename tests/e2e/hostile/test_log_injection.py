"""No text from a peer reaches the broker's log raw: a real broker process, its log read back.

An unauthenticated peer sends a GOAWAY whose debug data holds a newline, a forged log line and
an ANSI escape (gRPC's C core used to print it verbatim); an agent says hello with such an id
(our own log lines quote it).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from gpubroker.protos import agent_pb2, agent_pb2_grpc
from tests.support.cluster import BrokerProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # a real broker process

FORGED = "2030-01-01 00:00:00,000 INFO gpubroker.broker: FORGED"
EVIL = f"evil\n{FORGED}\r\x1b[31mred"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path).start()
    try:
        yield process
    finally:
        process.stop()


def _frame(kind: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:] + bytes([kind, 0]) + struct.pack(">I", stream) + payload
    )


def _goaway(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, b""))
        sock.sendall(_frame(7, 0, struct.pack(">II", 0, 2) + EVIL.encode()))
        sock.recv(65536)


async def _hello(address: str) -> None:
    async def messages() -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(
            hello=agent_pb2.AgentHello(agent_id=EVIL, slots=1, gpu_type="cpu")
        )

    async with grpc.aio.insecure_channel(address) as channel:
        call = agent_pb2_grpc.AgentGatewayStub(channel).Connect(messages(), timeout=5)
        await call.read()  # the welcome; then the stream closes and the broker logs it


def test_peer_text_never_reaches_the_log_raw(broker: BrokerProcess) -> None:
    _goaway(broker.port)
    asyncio.run(_hello(broker.address))
    wait_until(lambda: "disconnected" in broker.log(), 10, "the agent's disconnection in the log")

    log = broker.log()

    assert "\x1b" not in log and "\r" not in log
    assert not any(line.startswith(FORGED) for line in log.splitlines())
    assert "evil\\n2030-01-01" in log  # our own line, escaped

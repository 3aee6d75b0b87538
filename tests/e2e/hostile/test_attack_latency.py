"""A normal client's latency while stalled, dribbling and idle peers attack the broker.

A real broker process with short upload and connection limits, one agent, and a client timing
small ``run`` calls: first alone, then while 150 hostile streams and connections (each
re-opened as soon as the broker cuts it) hold what they can. Both p99s are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from gpubroker.client import Client
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.rpc import bearer

pytestmark = pytest.mark.slow  # real broker and agent processes, ~30 s

RUNS = 150
STALLED, DRIBBLING, IDLE = 60, 60, 30
ENV = {
    "GPUBROKER_UPLOAD_IDLE_TIMEOUT_S": "2",
    "GPUBROKER_UPLOAD_RATE_WINDOW_S": "2",
    "GPUBROKER_UPLOAD_MIN_RATE_KIB": "8",
    "GPUBROKER_CONNECTION_IDLE_S": "2",
}
ATTACKER = bearer("key-b")
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path, env=ENV).start()
    agent = AgentProcess(tmp_path, broker.address, "latency", slots=4).start()
    try:
        yield broker
    finally:
        agent.stop()
        broker.stop()


def _p99_ms(address: str) -> float:
    with Client(address, "key-a") as client:
        client.run("echo", [torch.zeros(4)], timeout=60)  # warm: agent connected, paths hot
        times = []
        for _ in range(RUNS):
            started = time.perf_counter()
            client.run("echo", [torch.zeros(4)], timeout=60)
            times.append(time.perf_counter() - started)
    return statistics.quantiles(times, n=100)[98] * 1000


def _header() -> broker_pb2.SubmitRequest:
    tensor = task_pb2.TensorHeader(dtype="uint8", shape=[1 << 20], nbytes=1 << 20)
    return broker_pb2.SubmitRequest(header=broker_pb2.TaskHeader(workload="echo", inputs=[tensor]))


async def _stalled() -> AsyncIterator[broker_pb2.SubmitRequest]:
    yield _header()
    await asyncio.sleep(3600)


async def _dribbling() -> AsyncIterator[broker_pb2.SubmitRequest]:
    yield _header()
    while True:
        yield broker_pb2.SubmitRequest(chunk=task_pb2.DataChunk(data=b"x" * 64))
        await asyncio.sleep(0.1)


async def _attack_stream(address: str, dribble: bool, cut: list[int]) -> None:
    """One hostile upload, opened again each time the broker cuts it."""
    async with grpc.aio.insecure_channel(address, OWN_CONNECTION) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Submit(_dribbling() if dribble else _stalled(), metadata=ATTACKER)
            cut.append(1)


async def _idle_connection(address: str) -> None:
    """A connection that makes one call and then sits idle, dialled again when closed."""
    while True:
        async with grpc.aio.insecure_channel(address, OWN_CONNECTION) as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.ListTasks(broker_pb2.ListTasksRequest(), metadata=ATTACKER)
            while channel.get_state() == grpc.ChannelConnectivity.READY:
                await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)


async def _under_attack(address: str) -> tuple[float, int]:
    cut: list[int] = []
    attackers = [
        asyncio.create_task(_attack_stream(address, i >= STALLED, cut))
        for i in range(STALLED + DRIBBLING)
    ]
    attackers += [asyncio.create_task(_idle_connection(address)) for _ in range(IDLE)]
    try:
        await asyncio.sleep(1.0)  # the attack is under way before the first timed run
        p99 = await asyncio.to_thread(_p99_ms, address)
    finally:
        for attacker in attackers:
            attacker.cancel()
        await asyncio.gather(*attackers, return_exceptions=True)
    return p99, len(cut)


def test_a_normal_clients_p99_stays_bounded_under_a_stream_attack(
    cluster: BrokerProcess,
) -> None:
    baseline = _p99_ms(cluster.address)

    attacked, cut = asyncio.run(_under_attack(cluster.address))

    print(f"\nsmall run p99: {baseline:.1f} ms alone, {attacked:.1f} ms under attack ({cut} cut)")
    assert cut > 0  # the broker did cut hostile streams while the client ran
    assert attacked < 5 * baseline + 100

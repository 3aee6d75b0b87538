"""What the broker learns from an agent's hello beyond its capabilities: when the hello came,
and when the agent's process started (the uptime it reports, taken from the arrival)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from gpubroker.broker.server import BrokerServer
from gpubroker.protos import agent_pb2, agent_pb2_grpc
from tests.fakes.agent import JOIN_TOKEN
from tests.support.rpc import bearer


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {"join_token": JOIN_TOKEN}


async def _hello_then_wait(hello: agent_pb2.AgentHello) -> AsyncIterator[agent_pb2.AgentMessage]:
    yield agent_pb2.AgentMessage(hello=hello)
    await asyncio.Event().wait()  # keep the stream open, as a live agent does


@pytest.mark.parametrize(
    ("uptime_s", "believed"),
    [(42.5, True), (0.0, False), (-3.0, False), (float("nan"), False), (1e12, False)],
    ids=["reported", "not-reported", "negative", "nan", "absurd"],
)
async def test_the_hello_says_when_the_agent_started(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel, uptime_s: float, believed: bool
) -> None:
    stub = agent_pb2_grpc.AgentGatewayStub(broker_channel)
    hello = agent_pb2.AgentHello(agent_id="a1", gpu_type="cpu", slots=1, uptime_seconds=uptime_s)
    before = datetime.now(UTC)

    call = stub.Connect(_hello_then_wait(hello), metadata=bearer(JOIN_TOKEN))
    welcome = await asyncio.wait_for(call.read(), 10)
    after = datetime.now(UTC)
    session = broker_server.registry.get("a1")
    call.cancel()

    assert isinstance(welcome, agent_pb2.BrokerMessage) and welcome.HasField("welcome")
    assert session is not None and session.info.connected_at is not None
    assert before <= session.info.connected_at <= after
    expected = session.info.connected_at - timedelta(seconds=uptime_s) if believed else None
    assert session.info.started_at == expected

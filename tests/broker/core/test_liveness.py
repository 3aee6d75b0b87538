"""A frozen agent (stream open, heartbeats stopped) gets no new work after one missed
heartbeat, gets work again once it speaks, and loses its held tasks when its lease expires."""

from __future__ import annotations

import logging
import re
import time

import grpc
import pytest

from gpubroker.broker.core.registry import SILENT_HEARTBEATS
from gpubroker.broker.server import BrokerServer
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import submit
from tests.support.waiting import wait_for

HEARTBEAT_S = 0.2
BEAT_S = 0.05  # the fake agents' own heartbeats: well inside the broker's interval


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {
        "api_keys": {"key-a": "tenant-a"},
        "join_token": JOIN_TOKEN,
        "heartbeat_interval_s": HEARTBEAT_S,
        "lease_timeout_s": 2.0,
        "reconcile_interval_s": 0,
    }


async def _frozen(server: BrokerServer, agent: FakeAgent) -> None:
    """Freezes ``agent`` and waits until the broker has missed one of its heartbeats."""
    agent.freeze()
    session = server.registry.get(agent.agent_id)
    assert session is not None
    silent = SILENT_HEARTBEATS * HEARTBEAT_S
    await wait_for(lambda: time.monotonic() - session.last_seen > silent, 5, "a missed beat")


async def test_a_frozen_agent_gets_no_new_work_and_gets_it_again_once_it_speaks(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    frozen = await FakeAgent.ready(broker_channel, "frozen", beat_s=BEAT_S)
    await _frozen(broker_server, frozen)

    passed_over = await submit(broker_channel, b"x")
    alive = await FakeAgent.ready(broker_channel, "alive", beat_s=BEAT_S)
    taken = (await alive.next()).assignment
    frozen.thaw()
    second = await submit(broker_channel, b"y")
    after_thaw = (await frozen.next()).assignment

    assert taken.task_id == passed_over  # the frozen agent had a free slot and was first
    assert after_thaw.task_id == second


async def test_a_frozen_agents_held_task_goes_back_when_its_lease_expires(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    frozen = await FakeAgent.ready(broker_channel, "frozen", beat_s=BEAT_S)
    task_id = await submit(broker_channel, b"x")
    first = (await frozen.next()).assignment
    await _frozen(broker_server, frozen)
    alive = await FakeAgent.ready(broker_channel, "alive", beat_s=BEAT_S)

    retry = (await alive.next()).assignment  # after the 2 s lease, not before

    assert (retry.task_id, retry.attempt) == (task_id, first.attempt + 1)
    assert await broker_server.store.lost_attempts(task_id) == 1


async def test_the_silence_logged_is_the_measured_one(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    await FakeAgent.ready(broker_channel, "quiet")
    session = broker_server.registry.get("quiet")
    assert session is not None
    await wait_for(lambda: session.granted, 5, "its credit")  # its last word until the end

    with caplog.at_level(logging.WARNING, "gpubroker.broker.core.dispatcher"):
        session.last_seen = time.monotonic() - 42.0  # as if it had been silent for 42 s
        await wait_for(lambda: "agent quiet silent for" in caplog.text, 5, "the watchdog")

    (silence,) = re.findall(r"agent quiet silent for ([0-9.]+)s", caplog.text)
    assert 42.0 <= float(silence) < 45.0  # not the 2 s lease timeout

"""The broker under hostile test: in this event loop, with a real agent process, for the module."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from tests.e2e.hostile.cases import KEYS, LIMITS
from tests.e2e.hostile.harness import Harness
from tests.support.cluster import AgentProcess, broker_settings, running_broker
from tests.support.waiting import wait_for


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def harness(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    """One broker with limits ``LIMITS``, one agent, one channel, for the whole module."""
    root = tmp_path_factory.mktemp("hostile")
    settings = broker_settings(
        root, api_keys=KEYS, heartbeat_interval_s=0.5, lease_timeout_s=30.0, limits=LIMITS
    )
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with running_broker(settings) as server:
        agent = AgentProcess(root, f"127.0.0.1:{server.port}", "hostile", slots=4).start()
        try:
            await wait_for(
                lambda: "echo" in server.workloads and len(server.registry) > 0,
                60,
                "the agent to connect",
                interval=0.05,
            )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options) as channel:
                yield Harness(server, settings.spool_dir, channel)
        finally:
            await asyncio.to_thread(agent.stop)

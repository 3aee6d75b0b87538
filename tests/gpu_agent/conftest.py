"""Fixtures of the agent tests: a fake gateway on a loopback port and real agents dialling it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import pytest

from gpubroker.gpu_agent.agent import Agent
from gpubroker.gpu_agent.config import Backoff, Settings
from gpubroker.gpu_agent.runner import Runner, detect_device
from gpubroker.gpu_agent.workloads import Workload, registry
from tests.fakes.gateway import TOKEN, WAIT_S, AgentFactory, FakeGateway, FakeGatewayServer


@pytest.fixture
async def broker() -> AsyncIterator[FakeGatewayServer]:
    """A fake gateway serving on a free loopback port."""
    server = FakeGatewayServer(FakeGateway())
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def start_agent(broker: FakeGatewayServer) -> AsyncIterator[AgentFactory]:
    """Starts real agents (CPU runner) against ``broker``; stops them all at the end."""
    started: list[tuple[Agent, Runner, asyncio.Task[None]]] = []

    def start(
        slots: int = 2, extra: Mapping[str, Workload] | None = None, prefetch: int = 0
    ) -> Agent:
        settings = Settings(
            broker_address=f"localhost:{broker.port}",
            agent_id="agent-under-test",
            slots=slots,
            prefetch=prefetch,
            device="cpu",
            join_token=TOKEN,
            backoff=Backoff(initial_s=0.02, max_s=0.2),
        )
        runner = Runner(detect_device("cpu"), slots, {**registry(), **(extra or {})})
        agent = Agent(settings, runner)
        started.append((agent, runner, asyncio.create_task(agent.run())))
        return agent

    yield start
    for agent, runner, task in started:
        await asyncio.wait_for(agent.stop(), WAIT_S)
        await task
        runner.close()

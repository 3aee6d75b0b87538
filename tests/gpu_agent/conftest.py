"""Fixtures of the agent tests: a fake gateway on a loopback port and real agents dialling it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpubroker.gpu_agent.agent import Agent
from gpubroker.gpu_agent.config import Backoff, ModelCacheSettings, Settings
from gpubroker.gpu_agent.runner import Runner, detect_device
from gpubroker.gpu_agent.workloads import Workload, registry
from gpubroker.protos import agent_pb2, task_pb2
from tests.fakes.gateway import TOKEN, WAIT_S, AgentFactory, FakeGateway, FakeGatewayServer

MODEL_CHUNK_BYTES = 64 << 10
"""Size of the chunks the model gateway streams a model file in."""


@dataclass
class ModelGateway(FakeGateway):
    """The fake gateway, also serving model files (``FetchModel``) from ``models``."""

    models: dict[str, bytes] = field(default_factory=dict)
    """Bytes served for each model id (they need not hash to it: a test may lie)."""
    model_fetches: list[str] = field(default_factory=list)
    """The model id of every FetchModel call, in order."""

    async def FetchModel(
        self, request: agent_pb2.FetchModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb2.FetchModelResponse]:
        self.model_fetches.append(request.model_id)
        data = self.models.get(request.model_id)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_id}")
            return
        for start in range(0, len(data), MODEL_CHUNK_BYTES):
            chunk = task_pb2.DataChunk(data=data[start : start + MODEL_CHUNK_BYTES])
            yield agent_pb2.FetchModelResponse(chunk=chunk)


@pytest.fixture
async def broker() -> AsyncIterator[FakeGatewayServer]:
    """A fake gateway (serving model files too) on a free loopback port."""
    server = FakeGatewayServer(ModelGateway())
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def model_gateway(broker: FakeGatewayServer) -> ModelGateway:
    """The gateway of ``broker``, with its model files."""
    assert isinstance(broker.gateway, ModelGateway)
    return broker.gateway


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The model cache folder of the agents ``start_agent`` starts."""
    return tmp_path / "models"


@pytest.fixture
async def start_agent(broker: FakeGatewayServer, model_dir: Path) -> AsyncIterator[AgentFactory]:
    """Starts real agents (CPU runner) against ``broker``; stops them all at the end."""
    started: list[tuple[Agent, Runner, asyncio.Task[None]]] = []

    def start(
        slots: int = 2,
        extra: Mapping[str, Workload] | None = None,
        prefetch: int = 0,
        models: ModelCacheSettings | None = None,
    ) -> Agent:
        settings = Settings(
            broker_address=f"localhost:{broker.port}",
            agent_id="agent-under-test",
            slots=slots,
            prefetch=prefetch,
            device="cpu",
            join_token=TOKEN,
            backoff=Backoff(initial_s=0.02, max_s=0.2),
            models=models or ModelCacheSettings(directory=str(model_dir)),
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

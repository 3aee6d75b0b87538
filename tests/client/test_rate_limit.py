"""A real broker's per-tenant submit rate against both clients: ``submit`` is slowed to the
rate instead of failing, and without retries the refusal surfaces. This also holds the broker's
refusal message and the client's reading of it (``client._retry.rate_limit_wait``) together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from gpubroker.broker.config import Limits
from gpubroker.broker.server import BrokerServer
from gpubroker.client import AsyncClient, Client, ResourceExhaustedError
from tests.support.cluster import broker_settings, running_broker

RATE = 20.0
BURST = 2
TASKS = 12
PAYLOAD = torch.arange(4, dtype=torch.float32)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[str]:
    """A broker (no agent: tasks stay queued) whose tenant may submit RATE tasks/s."""
    limits = Limits(submit_rate_per_s=RATE, submit_burst=BURST)
    settings = broker_settings(tmp_path, api_keys={"key-a": "tenant-a"}, limits=limits)
    server: BrokerServer
    async with running_broker(settings) as server:
        yield f"127.0.0.1:{server.port}"


def _submit_all(address: str) -> list[str]:
    with Client(address, "key-a") as client:
        return [client.submit("echo", [PAYLOAD]).task_id for _ in range(TASKS)]


async def test_sync_submits_over_the_rate_are_slowed_to_it_not_failed(broker: str) -> None:
    started = time.monotonic()

    ids = await asyncio.to_thread(_submit_all, broker)

    assert len(set(ids)) == TASKS
    assert time.monotonic() - started >= (TASKS - BURST) / RATE * 0.9


async def test_concurrent_async_submits_over_the_rate_all_get_in(broker: str) -> None:
    async with AsyncClient(broker, "key-a") as client:
        started = time.monotonic()
        handles = await asyncio.gather(*(client.submit("echo", [PAYLOAD]) for _ in range(TASKS)))
        elapsed = time.monotonic() - started

    assert len({h.task_id for h in handles}) == TASKS
    assert elapsed >= (TASKS - BURST) / RATE * 0.9


async def test_without_retries_a_submit_over_the_rate_is_refused(broker: str) -> None:
    async with AsyncClient(broker, "key-a", retry_for=0) as client:
        with pytest.raises(ResourceExhaustedError, match="submit rate"):
            for _ in range(BURST + 1):
                await client.submit("echo", [PAYLOAD])

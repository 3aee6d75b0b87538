"""A client rides through a broker restart: a real broker process killed and started again on
the same port and database while clients submit, watch and wait."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from gpubroker.client import AsyncClient, Client, TaskHandle, TaskState, TaskStatus
from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # end to end: real broker and agent processes

TASK_SECONDS = 0.3


def _submit_until(
    client: Client, stop: threading.Event, started: threading.Event
) -> list[tuple[float, TaskHandle]]:
    """Submits a task every few milliseconds until ``stop``, and five more after it."""
    handles: list[tuple[float, TaskHandle]] = []
    extra = 5
    while extra:
        value = float(len(handles))
        handles.append((value, client.submit("sleep", torch.tensor([value]), seconds=TASK_SECONDS)))
        started.set()
        if stop.wait(0.02):
            extra -= 1
    return handles


async def _watch_to_the_end(address: str, task_id: str) -> list[TaskStatus]:
    async with AsyncClient(address, "key-a") as client:
        return [status async for status in client.watch(task_id, timeout=120)]


def test_submit_watch_wait_and_result_ride_through_a_broker_restart(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path).start()
    agent = AgentProcess(tmp_path, broker.address, "steady", slots=2).start()
    try:
        with Client(broker.address, "key-a", retry_for=60) as client:
            first = client.submit("sleep", torch.ones(1), seconds=TASK_SECONDS)
            watched: list[list[TaskStatus]] = []
            watcher = threading.Thread(
                target=lambda: watched.append(
                    asyncio.run(_watch_to_the_end(broker.address, held.task_id))
                )
            )
            held = client.submit("sleep", torch.ones(1), seconds=8.0)  # runs across the restart
            watcher.start()
            stop, started = threading.Event(), threading.Event()
            submitted: list[list[tuple[float, TaskHandle]]] = []
            submitter = threading.Thread(
                target=lambda: submitted.append(_submit_until(client, stop, started))
            )
            submitter.start()
            wait_until(started.is_set, 30, "the first submit")

            broker.kill()
            broker.start(same_port=True)
            stop.set()
            submitter.join(120)

            assert submitted, "the submitter raised (see the captured output)"
            final = held.wait(timeout=120)
            results = {value: h.result(timeout=120).output.item() for value, h in submitted[0]}
            first_result = first.result(timeout=120)
            watcher.join(120)
    finally:
        agent.stop()
        broker.stop()

    assert results == {value: value for value, _ in submitted[0]}
    assert len(results) > 5  # some were submitted while the broker was down or starting
    assert final.state is TaskState.SUCCEEDED
    assert first_result.ok and first_result.output.tolist() == [1.0]
    assert watched and watched[0][-1].state is TaskState.SUCCEEDED
    assert len({s.task_id for s in watched[0]}) == 1

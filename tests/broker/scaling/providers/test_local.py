"""The ``local`` provider with real agent processes, against a real broker in this event loop.

Provider calls block (they wait on processes), so the tests make them from a worker thread, as
the autoscaler does, leaving the event loop free to serve the agents.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gpubroker.broker.scaling.providers.base import InstanceStatus, LaunchRequest, Provider
from gpubroker.broker.scaling.providers.local import LocalProvider, LocalSettings
from gpubroker.broker.server import BrokerServer
from gpubroker.client import AsyncClient
from tests.support.waiting import wait_for, wait_until

REQUEST = LaunchRequest(gpu_types=("cpu",), spot=False)
JOIN_TOKEN = "join-me"
UNREACHABLE = "127.0.0.1:1"
"""A broker address nobody listens on: the agent keeps retrying, and that is all it does."""


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {
        "api_keys": {"key-a": "tenant-a"},
        "join_token": JOIN_TOKEN,
        "heartbeat_interval_s": 0.2,
        "lease_timeout_s": 1.0,
    }


def _settings(tmp_path: Path, broker_address: str) -> LocalSettings:
    return LocalSettings(
        broker_address=broker_address,
        state_dir=tmp_path / "agents",
        slots=1,
        join_token=JOIN_TOKEN,
        stop_grace_s=10.0,
    )


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[LocalProvider]:
    """A provider whose agents dial nowhere; closed (every agent stopped) afterwards."""
    local = LocalProvider(_settings(tmp_path, UNREACHABLE))
    try:
        yield local
    finally:
        local.close()


def _pid_alive(pid: int) -> bool:
    try:
        return b"gpubroker.gpu_agent" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.slow  # a real agent process
async def test_a_launched_agent_joins_runs_work_and_drains_on_terminate(
    broker_server: BrokerServer, tmp_path: Path
) -> None:
    provider = LocalProvider(_settings(tmp_path, f"127.0.0.1:{broker_server.port}"))
    try:
        instance = await asyncio.to_thread(provider.launch, REQUEST)
        await wait_for(
            lambda: broker_server.registry.get(instance.name),
            15.0,
            "the agent to connect",
            interval=0.05,
        )
        async with AsyncClient(f"127.0.0.1:{broker_server.port}", "key-a") as client:
            result = await client.run("echo", [torch.arange(3)], timeout=30)
        listed = await asyncio.to_thread(provider.list)

        await asyncio.to_thread(provider.terminate, instance.name)

        await wait_for(
            lambda: broker_server.registry.get(instance.name) is None,
            15.0,
            "the agent to leave",
            interval=0.05,
        )
    finally:
        await asyncio.to_thread(provider.close)
    assert instance.name.startswith("local-")
    assert (instance.zone, instance.machine_type, instance.gpu_type) == ("local", "local", "cpu")
    assert instance.spot is False and instance.status is InstanceStatus.RUNNING
    assert isinstance(result.output, torch.Tensor) and result.output.equal(torch.arange(3))
    assert [(i.name, i.status) for i in listed] == [(instance.name, InstanceStatus.RUNNING)]
    assert await asyncio.to_thread(provider.list) == []
    log = (tmp_path / "agents" / f"{instance.name}.log").read_text()
    assert "draining, then exiting" in log and "agent stopped" in log


def test_an_agent_that_dies_is_listed_once_as_terminated(provider: LocalProvider) -> None:
    instance = provider.launch(REQUEST)
    os.kill(int(instance.labels["pid"]), signal.SIGKILL)

    deadline = time.monotonic() + 10.0
    first = provider.list()
    while first[0].status is InstanceStatus.RUNNING and time.monotonic() < deadline:
        first = provider.list()  # the kill lands asynchronously
    second = provider.list()

    assert [(i.name, i.status) for i in first] == [(instance.name, InstanceStatus.TERMINATED)]
    assert second == []


def test_a_fresh_provider_finds_and_stops_agents_a_previous_one_left(
    provider: LocalProvider, tmp_path: Path
) -> None:
    instance = provider.launch(REQUEST)
    pid = int(instance.labels["pid"])
    # The kernel fills in a new command line a moment after exec lets the parent go on.
    wait_until(lambda: _pid_alive(pid), 5.0, "the agent's command line", interval=0.01)
    successor = LocalProvider(_settings(tmp_path, UNREACHABLE))

    found = successor.list()
    successor.terminate(instance.name)

    assert [(i.name, i.status, i.created_at) for i in found] == [
        (instance.name, InstanceStatus.RUNNING, instance.created_at)
    ]
    assert not _pid_alive(pid)
    assert successor.list() == []
    assert json.loads((tmp_path / "agents" / "instances.json").read_text()) == {"instances": []}


def test_a_pid_file_entry_whose_pid_is_not_that_agent_is_ignored(tmp_path: Path) -> None:
    # Given a pid file naming this test process: a recycled pid must never be signalled
    state = tmp_path / "agents" / "instances.json"
    state.parent.mkdir()
    entry = {"name": "local-0000", "pid": os.getpid(), "created_at": "2026-01-01T00:00:00+00:00"}
    state.write_text(json.dumps({"instances": [entry]}))
    provider = LocalProvider(_settings(tmp_path, UNREACHABLE))

    assert provider.list() == []
    provider.terminate("local-0000")  # nothing to stop, and no error


def test_a_damaged_pid_file_reads_as_no_agents(tmp_path: Path) -> None:
    state = tmp_path / "agents" / "instances.json"
    state.parent.mkdir()
    state.write_text("{not json")

    assert LocalProvider(_settings(tmp_path, UNREACHABLE)).list() == []


def test_terminating_an_unknown_instance_is_not_an_error(provider: LocalProvider) -> None:
    as_protocol: Provider = provider  # mypy checks that LocalProvider is a Provider

    as_protocol.terminate("local-ffffffff")

    assert as_protocol.name == "local"
    assert as_protocol.list() == []

"""Agents on demand, end to end: the local provider scales from zero and back, and a Spot
preemption notice gets an agent's work requeued at once and unbilled."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from gpubroker.billing.models import tasks, usage, vm_instances
from gpubroker.client import Client, TaskState
from tests.fakes.metadata import FakeMetadataServer
from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # end to end: real broker (and agent) processes

SCALING = """
[policy]
interval_s = 0.3
max_instances = 2
slots_per_instance = 2
default_boot_s = 1.0
min_idle_s = 1.0
keep_factor = 1.0
scale_up_cooldown_s = 0.5

[local]
slots = 2
stop_grace_s = 10.0
"""


def _vms(broker: BrokerProcess) -> list[dict[str, object]]:
    engine = sa.create_engine(broker.database_url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(vm_instances))]
    engine.dispose()
    return rows


def test_the_local_provider_starts_agents_for_a_burst_and_stops_them_when_idle(
    tmp_path: Path,
) -> None:
    config = tmp_path / "scaling.toml"
    config.write_text(SCALING)
    broker = BrokerProcess(
        tmp_path, provider="local", env={"GPUBROKER_SCALING_CONFIG": str(config)}
    ).start()
    try:
        assert _vms(broker) == []  # nothing runs, nothing is paid for, until there is work
        with Client(broker.address, "key-a") as client:
            handles = [
                client.submit("add", [torch.tensor([float(i)]), torch.ones(1)]) for i in range(8)
            ]
            values = [h.result(timeout=90).output.item() for h in handles]
        assert values == [i + 1.0 for i in range(8)]

        started = _vms(broker)
        assert 1 <= len(started) <= 2  # max_instances
        assert all(vm["provider"] == "local" and vm["gpu_type"] == "cpu" for vm in started)
        # Idle agents are stopped after the grace (min_idle_s, boot-time break-even).
        wait_until(
            lambda: all(vm["deleted_at"] is not None for vm in _vms(broker)),
            60,
            "idle agents to stop",
        )
        assert {vm["end_reason"] for vm in _vms(broker)} == {"idle"}
        assert all(vm["running_at"] is not None for vm in _vms(broker))
        # Each agent said in its hello how long its process had run: when it started, between
        # its process being created and its hello.
        for vm in _vms(broker):
            created, began, connected = (vm[k] for k in ("created_at", "agent_started_at",
                                                         "connected_at"))  # fmt: skip
            assert isinstance(created, datetime) and isinstance(began, datetime), vm
            assert isinstance(connected, datetime), vm
            assert created - timedelta(seconds=1) <= began <= connected, vm

        report = subprocess.run(
            [
                sys.executable,
                "-m",
                "gpubroker.billing",
                "overhead",
                "--database-url",
                broker.database_url,
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert '"vms"' in report.stdout or "vm" in report.stdout.lower()
    finally:
        broker.stop()


def test_a_preempted_agent_gives_its_work_back_at_once_and_the_lost_attempt_is_not_billed(
    tmp_path: Path,
) -> None:
    # A long lease timeout: only the preemption notice can explain a quick requeue.
    broker = BrokerProcess(tmp_path, heartbeat_s=1.0, lease_timeout_s=60.0).start()
    with FakeMetadataServer() as metadata:
        spot = AgentProcess(tmp_path, broker.address, "spot", slots=1, metadata_url=metadata.url)
        spot.start()
        spare: AgentProcess | None = None
        try:
            with Client(broker.address, "key-a") as client:
                handle = client.submit("sleep", [torch.ones(1)], seconds=3.0)
                wait_until(lambda: handle.status().state is TaskState.RUNNING, 60, "task to start")
                spare = AgentProcess(tmp_path, broker.address, "spare", slots=1).start()
                wait_until(lambda: metadata.waiting >= 1, 30, "the watcher to wait")

                preempted_at = time.monotonic()
                metadata.preempt()
                wait_until(lambda: handle.status().attempt == 2, 20, "the task to be requeued")
                requeued_after = time.monotonic() - preempted_at
                result = handle.result(timeout=60)
            assert result.status.attempt == 2
            assert requeued_after < 20  # the lease timeout is 60 s
            wait_until(lambda: not spot.alive, 30, "the preempted agent to exit")
            assert "preempted" in spot.log()

            engine = sa.create_engine(broker.database_url)
            with engine.connect() as conn:
                row = conn.execute(sa.select(tasks).where(tasks.c.id == handle.task_id)).one()
                billed = conn.execute(
                    sa.select(usage.c.attempt, usage.c.agent_id).where(
                        usage.c.task_id == handle.task_id
                    )
                ).all()
            engine.dispose()
            assert row.agent_id == "spare"
            assert [tuple(b) for b in billed] == [(2, "spare")]  # attempt 1 was never billed
        finally:
            for agent in (spot, spare):
                if agent is not None:
                    agent.stop()
            broker.stop()

"""Work spreads over the agents, end to end: an agent that connects after another took the
whole backlog into its prefetch gets work at once, and every agent the ``local`` provider
launches for a burst runs some of it (before, the first agent up took every task)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from gpubroker.billing.models import tasks, vm_instances
from gpubroker.client import Client, TaskState
from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # end to end: real broker and agent processes

SLEEP_S = 20.0
"""Each task's length: several times what an agent process takes to start on a busy 2-core
machine, so the agent that connects first still holds its prefetched tasks when others come."""


def _rows(broker: BrokerProcess, table: sa.Table) -> list[dict[str, object]]:
    engine = sa.create_engine(broker.database_url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(table))]
    engine.dispose()
    return rows


def _ran(broker: BrokerProcess) -> dict[str, list[int]]:
    """Agent id -> the attempt numbers of the tasks it finished."""
    done: dict[str, list[int]] = {}
    for row in _rows(broker, tasks):
        if row["state"] == "succeeded":
            done.setdefault(str(row["agent_id"]), []).append(int(str(row["attempt"])))
    return done


def test_an_agent_that_connects_after_another_took_the_backlog_gets_work_at_once(
    tmp_path: Path,
) -> None:
    broker = BrokerProcess(tmp_path).start()
    first = AgentProcess(tmp_path, broker.address, "first", slots=2).start()
    late: AgentProcess | None = None
    try:
        wait_until(lambda: "connected to" in first.log(), 60, "the first agent to connect")
        with Client(broker.address, "key-a") as client:
            # Two in its slots, two prefetched (an agent that has timed no task yet prefetches
            # one per slot): the first agent holds the whole backlog.
            handles = [
                client.submit("sleep", [torch.full((1,), float(i))], seconds=SLEEP_S)
                for i in range(4)
            ]
            wait_until(
                lambda: all(h.status().state is TaskState.RUNNING for h in handles),
                30,
                "the first agent to take all four",
            )
            late = AgentProcess(tmp_path, broker.address, "late", slots=2).start()
            wait_until(lambda: "connected to" in late.log(), 60, "the late agent to connect")
            connected_at = time.monotonic()
            wait_until(
                lambda: (
                    "recalled" in broker.log() and any(h.status().attempt == 2 for h in handles)
                ),
                15,
                "a prefetched task to be recalled for the late agent",
            )
            recalled_after = time.monotonic() - connected_at
            outputs = [h.result(timeout=90).output.item() for h in handles]
            histories = [
                [(a.number, a.agent_id, a.outcome) for a in h.status().attempts] for h in handles
            ]
        assert outputs == [0.0, 1.0, 2.0, 3.0]
        # Each task's status says which agent ran each attempt, and why one went back.
        assert sorted(histories) == [
            [(1, "first", "recalled"), (2, "late", "succeeded")],
            [(1, "first", "recalled"), (2, "late", "succeeded")],
            [(1, "first", "succeeded")],
            [(1, "first", "succeeded")],
        ]
        ran = _ran(broker)
        # Both ran tasks; the late agent ran the two the first had not started, on a second
        # attempt each, and nothing ran more than twice.
        assert sorted(ran) == ["first", "late"], ran
        assert sorted(ran["first"]) == [1, 1]
        assert sorted(ran["late"]) == [2, 2]
        assert recalled_after < SLEEP_S  # before the first agent's slots were free again
        assert "cancelling" in first.log()  # told to drop them, so it never ran them
    finally:
        for agent in (first, late):
            if agent is not None:
                agent.stop()
        broker.stop()


BURST_SCALING = """
[policy]
interval_s = 0.3
max_instances = 3
slots_per_instance = 2
default_boot_s = 1.0
min_idle_s = 1.0
keep_factor = 1.0
scale_up_cooldown_s = 0.5

[local]
slots = 2
stop_grace_s = 10.0
"""


def test_every_agent_the_local_provider_launches_for_a_burst_runs_part_of_it(
    tmp_path: Path,
) -> None:
    config = tmp_path / "scaling.toml"
    config.write_text(BURST_SCALING)
    broker = BrokerProcess(
        tmp_path, provider="local", env={"GPUBROKER_SCALING_CONFIG": str(config)}
    ).start()
    try:
        with Client(broker.address, "key-a") as client:
            # Six tasks, three agents of two slots: the first agent up could hold four.
            handles = [
                client.submit("sleep", [torch.full((1,), float(i))], seconds=SLEEP_S)
                for i in range(6)
            ]
            outputs = [h.result(timeout=120).output.item() for h in handles]
        assert outputs == [float(i) for i in range(6)]

        launched = {str(vm["name"]) for vm in _rows(broker, vm_instances)}
        ran = _ran(broker)
        assert len(launched) >= 2, launched  # else there is nothing to spread over
        # No launched agent sat idle while another held a backlog.
        assert set(ran) == launched, (launched, ran)
        assert all(attempt <= 2 for attempts in ran.values() for attempt in attempts)
    finally:
        broker.stop()

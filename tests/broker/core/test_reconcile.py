"""Reconciliation: memory corrupted on purpose is repaired from the database, and only then.

Each test breaks the queue or a lease by hand (what a lost in-memory change would leave), runs
passes of the broker's own reconciler, and checks the repair, its WARNING and its counter.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from prometheus_client import generate_latest

from gpubroker.broker.core.reconcile import Drift, Finding, compare
from gpubroker.broker.core.registry import Lease
from gpubroker.broker.model import TaskState
from gpubroker.broker.server import BrokerServer
from gpubroker.broker.storage.transitions import LiveRow
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import submit
from tests.support.waiting import wait_for


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    # No periodic pass: each test runs the passes itself.
    return {"api_keys": {"key-a": "tenant-a"}, "join_token": JOIN_TOKEN, "reconcile_interval_s": 0}


async def _two_passes(server: BrokerServer) -> tuple[list[Finding], list[Finding]]:
    assert server.reconciler is not None
    return await server.reconciler.reconcile(), await server.reconciler.reconcile()


def _count(server: BrokerServer, drift: Drift) -> float:
    value = server.metrics.registry.get_sample_value(
        "gpubroker_reconciled_tasks_total", {"kind": drift.value}
    )
    return value or 0.0


async def test_a_queued_task_missing_from_the_queue_is_pushed_back_and_runs(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    task_id = await submit(broker_channel, b"x")
    assert broker_server.queue.remove(task_id)  # the row says queued; the queue lost it

    with caplog.at_level(logging.WARNING, "gpubroker.broker.core.reconcile"):
        first, second = await _two_passes(broker_server)
    agent = await FakeAgent.ready(broker_channel, "a1")
    assignment = (await agent.next()).assignment

    assert first == []  # seen once: it may be a submit between its commit and its push
    assert [(f.drift, f.task_id) for f in second] == [(Drift.QUEUED_MISSING, task_id)]
    assert (assignment.task_id, assignment.attempt) == (task_id, 1)
    assert f"reconciled task {task_id} (queued_missing)" in caplog.text
    assert _count(broker_server, Drift.QUEUED_MISSING) == 1
    text = generate_latest(broker_server.metrics.registry).decode()
    assert 'gpubroker_reconciled_tasks_total{kind="queued_missing"} 1.0' in text


async def test_a_running_task_no_session_leases_is_requeued_as_a_lost_attempt(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    task_id = await submit(broker_channel, b"x")
    first = (await agent.next()).assignment
    session = broker_server.registry.get("a1")
    assert session is not None
    session.leases.pop(task_id)  # the row says running on a1; a1's session forgot it
    broker_server.queue.finished("tenant-a")

    _, repaired = await _two_passes(broker_server)
    agent.credit()
    retry = (await agent.next()).assignment

    assert [(f.drift, f.task_id) for f in repaired] == [(Drift.RUNNING_UNLEASED, task_id)]
    assert (retry.task_id, retry.attempt) == (task_id, first.attempt + 1)
    assert await broker_server.store.lost_attempts(task_id) == 1
    assert _count(broker_server, Drift.RUNNING_UNLEASED) == 1


async def test_a_finished_task_left_in_the_queue_is_dropped(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    task_id = await submit(broker_channel, b"x")
    cancelled = await broker_server.tasks.cancel("tenant-a", task_id)
    broker_server.dispatcher.restore(cancelled)  # the queue holds a cancelled task again

    _, repaired = await _two_passes(broker_server)

    assert [(f.drift, f.task_id) for f in repaired] == [(Drift.QUEUED_STALE, task_id)]
    assert task_id not in broker_server.queue
    assert (await broker_server.store.get(task_id)).state is TaskState.CANCELLED


async def test_a_lease_on_a_finished_task_is_released_and_revoked(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    task_id = await submit(broker_channel, b"x")
    assignment = (await agent.next()).assignment
    running = await broker_server.store.get(task_id)
    await agent.put(assignment, b"y")
    session = broker_server.registry.get("a1")
    assert session is not None
    session.leases[task_id] = Lease(running)  # a lease that outlived its task
    broker_server.queue.started("tenant-a")

    _, repaired = await _two_passes(broker_server)
    revoked = (await agent.next()).cancel

    assert [(f.drift, f.task_id) for f in repaired] == [(Drift.LEASE_STALE, task_id)]
    assert task_id not in session.leases
    assert (revoked.attempt.task_id, revoked.attempt.attempt) == (task_id, assignment.attempt)
    assert broker_server.queue.running("tenant-a") == 0


async def test_a_task_with_a_commit_in_flight_is_left_alone_until_it_ends(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    task_id = await submit(broker_channel, b"x")
    broker_server.queue.remove(task_id)

    with broker_server.dispatcher.in_flight.working([task_id]):
        during = await _two_passes(broker_server)
    after = await _two_passes(broker_server)

    assert during == ([], [])
    assert [f.task_id for f in after[1]] == [task_id]
    await wait_for(lambda: task_id in broker_server.queue, 5, "the task back in the queue")


async def test_memory_that_agrees_with_the_database_needs_no_repair(
    broker_server: BrokerServer, broker_channel: grpc.aio.Channel
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1")
    running = await submit(broker_channel, b"x")
    await agent.next()
    queued = await submit(broker_channel, b"y")

    passes = await _two_passes(broker_server)

    assert passes == ([], [])
    assert queued in broker_server.queue and running not in broker_server.queue


def test_compare_finds_each_kind_of_difference_and_skips_busy_tasks() -> None:
    rows = [
        LiveRow("missing", TaskState.QUEUED, 0, None),
        LiveRow("unleased", TaskState.RUNNING, 2, "a1"),
        LiveRow("moved", TaskState.RUNNING, 3, "a2"),
        LiveRow("fine", TaskState.RUNNING, 1, "a1"),
        LiveRow("busy", TaskState.QUEUED, 0, None),
    ]
    leases = {"fine": ("a1", 1), "moved": ("a1", 2), "gone": ("a1", 4)}

    found = compare(rows, ["final", "busy-final"], leases, {"busy", "busy-final"})

    assert {(f.drift, f.task_id, f.attempt, f.agent_id) for f in found} == {
        (Drift.QUEUED_MISSING, "missing", 0, None),
        (Drift.RUNNING_UNLEASED, "unleased", 2, "a1"),
        (Drift.LEASE_STALE, "moved", 2, "a1"),
        (Drift.RUNNING_UNLEASED, "moved", 3, "a2"),
        (Drift.QUEUED_STALE, "final", 0, None),
        (Drift.LEASE_STALE, "gone", 4, "a1"),
    }

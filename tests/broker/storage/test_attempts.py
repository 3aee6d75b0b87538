"""Attempts lost to infrastructure are counted apart from a task's own, on SQLite and PostgreSQL.

A poison task (its agent lost ``max_lost_attempts`` times) fails saying so; a broker restart
counts as a lost attempt, never as one of the task's own; ``max_attempts`` caps the attempts
whose results could not be used.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.model import AgentInfo, Attempt, TaskSpec, TaskState
from gpubroker.broker.storage.store import TaskStore
from gpubroker.broker.storage.transitions import Cause, LiveRow, Retries
from gpubroker.protos.states import FailureCode
from gpubroker.protos.wire import TensorMeta

NOW = datetime(2026, 12, 10, 12, 0, tzinfo=UTC)
AGENT = AgentInfo("agent-1", "nvidia-l4", 1 << 30, 2, frozenset({"echo"}))
RETRIES = Retries(max_attempts=2, max_lost_attempts=4)


@pytest.fixture
def store(engine: sa.Engine) -> TaskStore:
    store = TaskStore(engine, PriceCatalog.load())
    spec = TaskSpec(workload="echo", inputs=(TensorMeta("uint8", (1,), 1, 1),))
    store.create("t1", "tenant", spec, NOW, None)
    return store


def _run_and_requeue(store: TaskStore, cause: Cause, reason: str = "lost") -> TaskState:
    (claimed,) = store.claim_many(["t1"], AGENT, NOW)
    return store.requeue(Attempt("t1", claimed.attempt), RETRIES, NOW, reason, cause).state


def test_a_task_whose_agent_is_lost_again_and_again_fails_as_a_poison_task(
    store: TaskStore,
) -> None:
    states = [_run_and_requeue(store, Cause.LOST, "control stream closed") for _ in range(4)]

    task = store.get("t1")
    assert states == [TaskState.QUEUED] * 3 + [TaskState.FAILED]
    assert task.error_code is FailureCode.ABORTED
    assert (task.error_message or "").startswith("poison task: its agent was lost 4 times")
    assert "limit is 4" in (task.error_message or "")
    assert (task.error_message or "").endswith("last: control stream closed")


def test_lost_attempts_do_not_use_up_the_tasks_own_attempts(store: TaskStore) -> None:
    for _ in range(3):
        _run_and_requeue(store, Cause.LOST)

    state = _run_and_requeue(store, Cause.REJECTED, "corrupt result")

    assert state is TaskState.QUEUED
    assert store.lost_attempts("t1") == 3
    assert store.get("t1").attempt == 4


def test_rejected_results_fail_the_task_after_max_attempts_of_its_own(store: TaskStore) -> None:
    _run_and_requeue(store, Cause.LOST)

    states = [_run_and_requeue(store, Cause.REJECTED, "checksum mismatch") for _ in range(2)]

    task = store.get("t1")
    assert states == [TaskState.QUEUED, TaskState.FAILED]
    assert task.error_code is FailureCode.ABORTED
    assert task.error_message == (
        "gave up after 2 attempts whose results could not be used; last: checksum mismatch"
    )


def test_a_broker_restart_counts_the_running_attempt_as_lost(store: TaskStore) -> None:
    store.claim_many(["t1"], AGENT, NOW)

    queued, _ = store.recover(NOW)

    assert [t.id for t in queued] == ["t1"]
    assert store.lost_attempts("t1") == 1
    # Agent crash, broker crash, agent crash: the task is still queued, none of its own used.
    assert _run_and_requeue(store, Cause.LOST) is TaskState.QUEUED
    assert _run_and_requeue(store, Cause.REJECTED) is TaskState.QUEUED
    assert store.lost_attempts("t1") == 2


def test_a_task_recovery_leaves_queued_alone_counts_nothing(store: TaskStore) -> None:
    store.recover(NOW)

    assert store.lost_attempts("t1") == 0


def test_live_lists_queued_and_running_tasks_with_their_attempts(store: TaskStore) -> None:
    spec = TaskSpec(workload="echo", inputs=(TensorMeta("uint8", (1,), 1, 1),))
    store.create("t2", "tenant", spec, NOW, None)
    store.create("t3", "tenant", spec, NOW, None)
    store.claim_many(["t2"], AGENT, NOW)
    store.cancel("t3", None, NOW)

    rows = store.live()

    assert rows == [
        LiveRow("t1", TaskState.QUEUED, 0, None),
        LiveRow("t2", TaskState.RUNNING, 1, "agent-1"),
    ]

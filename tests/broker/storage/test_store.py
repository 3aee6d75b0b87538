"""The task store on SQLite and PostgreSQL: changes are fenced by attempt, billing is atomic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import cast

import pytest
import sqlalchemy as sa

from gpubroker.billing.models import tasks, usage
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.errors import RequestConflictError, StaleAttemptError, TaskNotFoundError
from gpubroker.broker.model import (
    AgentInfo,
    Attempt,
    AttemptOutcome,
    GpuRequirement,
    Task,
    TaskSpec,
    TaskState,
)
from gpubroker.broker.storage.store import TaskStore
from gpubroker.broker.storage.transitions import Cause, Retries
from gpubroker.protos.states import FailureCode
from gpubroker.protos.wire import TensorMeta

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
META = TensorMeta("float32", (4,), 16, 123)
AGENT = AgentInfo("agent-1", "nvidia-l4", 1 << 30, 2, frozenset({"echo"}))
OTHER = AgentInfo("agent-2", "nvidia-l4", 1 << 30, 2, frozenset({"echo"}))
RETRIES = Retries(max_attempts=3, max_lost_attempts=10)


@pytest.fixture
def store(engine: sa.Engine) -> TaskStore:
    return TaskStore(engine, PriceCatalog.load())


def _spec(request_id: str | None = None, nbytes: int = 16) -> TaskSpec:
    meta = TensorMeta("uint8", (nbytes,), nbytes, 1)
    return TaskSpec(workload="echo", inputs=(meta,), params={"k": 1}, request_id=request_id)


def _claim(store: TaskStore, task_id: str, agent: AgentInfo) -> Task | None:
    claimed = store.claim_many([task_id], agent, NOW)
    return claimed[0] if claimed else None


def _outcome(
    task_id: str, attempt: int, agent: str = "agent-1", seconds: float = 90.0
) -> AttemptOutcome:
    return AttemptOutcome(
        agent, Attempt(task_id, attempt), outputs=(META,), compute_seconds=seconds
    )


def test_a_created_task_is_queued_with_its_inputs_and_params(store: TaskStore) -> None:
    task, deduplicated = store.create("t1", "tenant", _spec(), NOW, None)

    assert not deduplicated
    assert task.state is TaskState.QUEUED and task.attempt == 0
    assert task.params == {"k": 1}
    assert store.get("t1", "tenant").inputs == _spec().inputs


def test_a_created_task_is_what_its_row_reads_back(store: TaskStore) -> None:
    spec = TaskSpec("echo", (META,), {"f": 0.1, "s": "x", "b": True}, 3, "r1", 60.0)
    local = datetime(2026, 11, 24, 7, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-5)))

    task, _ = store.create("t1", "tenant", spec, local, local + timedelta(minutes=1), b"x" * 16)

    assert task == store.get("t1")
    assert task.created_at.tzinfo == UTC and task.created_at == local


def test_the_drivers_task_insert_stores_what_sqlalchemys_insert_stores(
    store: TaskStore, engine: sa.Engine
) -> None:
    # create() inserts on the driver's cursor; every column, in its stored form, must come out
    # as from a plain Core insert of the same values.
    requires = GpuRequirement("nvidia-l4", 16 << 30)
    spec = TaskSpec(
        "echo", (META,), {"f": 0.1, "s": "é", "b": True, "i": 7}, 3, "r1", 60.0, requires
    )
    local = datetime(2026, 11, 24, 7, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-5)))
    store.create(
        "fast", "tenant", spec, local, local + timedelta(minutes=1), b"\x00x", call_bound=True
    )
    values = {
        c.name: getattr(store.get("fast"), c.name, None) for c in tasks.columns if c.name != "seq"
    }
    values.update(
        id="core",
        request_id="r2",
        state="queued",
        params=dict(spec.params),
        inputs=[{"name": "", "dtype": "float32", "shape": [4], "nbytes": 16, "crc32c": 123}],
        requires_gpu_type=requires.gpu_type,
        requires_gpu_memory=requires.min_memory_bytes,
    )
    del values["outputs"]  # not part of a new task: NULL, not JSON null
    del values["lost_attempts"]  # not on the snapshot: the column's default
    with engine.begin() as conn:
        conn.execute(tasks.insert(), [values])
        as_text = [sa.cast(c, sa.String) for c in tasks.columns if c.name not in ("seq", "id")]
        stored = {
            row[0]: row[1:]
            for row in conn.execute(sa.select(tasks.c.id, *as_text).order_by(tasks.c.seq))
        }
    fast, core = list(stored["fast"]), list(stored["core"])
    at = [c.name for c in tasks.columns if c.name not in ("seq", "id")].index("request_id")
    assert (fast[at], core[at]) == ("r1", "r2")
    fast[at] = core[at] = None
    assert fast == core


def test_a_driver_error_on_create_is_raised_as_sqlalchemys(store: TaskStore) -> None:
    store.create("t1", "tenant", _spec("r1"), NOW, None)

    with pytest.raises(sa.exc.IntegrityError):
        store.create("t1", "tenant", _spec("r2"), NOW, None)  # the id is taken

    assert [t.id for t in store.page("tenant", [], 10, None)] == ["t1"]


def test_a_success_built_on_the_running_task_is_what_its_row_reads_back(
    store: TaskStore,
) -> None:
    store.create("t1", "tenant", _spec(), NOW, None, b"x" * 16)
    running = _claim(store, "t1", AGENT)
    assert running is not None

    task = store.succeed(_outcome("t1", 1), NOW + timedelta(seconds=2), b"y" * 16, running)

    assert task == store.get("t1")
    assert task.state is TaskState.SUCCEEDED and task.inline_outputs == b"y" * 16


def test_a_success_on_a_running_task_that_moved_on_is_refused(store: TaskStore) -> None:
    store.create("t1", "tenant", _spec(), NOW, None)
    first = _claim(store, "t1", AGENT)
    assert first is not None
    store.requeue(Attempt("t1", 1), RETRIES, NOW, "lost", Cause.LOST)
    second = _claim(store, "t1", AGENT)
    assert second is not None

    with pytest.raises(StaleAttemptError):
        store.succeed(_outcome("t1", 1), NOW, None, first)
    with pytest.raises(ValueError, match="is not"):
        store.succeed(_outcome("t1", 2), NOW, None, first)  # the caller mixed up its tasks
    assert store.get("t1").state is TaskState.RUNNING


def test_the_same_request_id_returns_the_same_task(store: TaskStore) -> None:
    store.create("t1", "tenant", _spec("r1"), NOW, None)

    task, deduplicated = store.create("t2", "tenant", _spec("r1"), NOW, None)

    assert deduplicated and task.id == "t1"


def test_a_request_id_repeated_inside_one_batch_makes_one_task(store: TaskStore) -> None:
    results = store.run_batch(
        [
            lambda: store.create("t1", "tenant", _spec("r1"), NOW, None),
            lambda: store.create("t2", "tenant", _spec("r1"), NOW, None),
            lambda: store.create("t3", "other", _spec("r1"), NOW, None),  # another tenant's key
        ]
    )

    created = [cast(tuple[Task, bool], r) for r in results]
    assert [(t.id, dup) for t, dup in created] == [("t1", False), ("t1", True), ("t3", False)]
    assert [t.id for t in store.page("tenant", [], 10, None)] == ["t1"]


def test_a_request_id_reused_for_other_work_is_a_conflict(store: TaskStore) -> None:
    store.create("t1", "tenant", _spec("r1"), NOW, None)

    with pytest.raises(RequestConflictError):
        store.create("t2", "tenant", _spec("r1", nbytes=8), NOW, None)


def test_another_tenant_cannot_see_a_task(store: TaskStore) -> None:
    store.create("t1", "tenant", _spec(), NOW, None)

    with pytest.raises(TaskNotFoundError):
        store.get("t1", "intruder")
    with pytest.raises(TaskNotFoundError):
        store.cancel("t1", "intruder", NOW)


def test_each_claim_starts_a_new_attempt(store: TaskStore) -> None:
    store.create("t1", "tenant", _spec(), NOW, None)

    first = _claim(store, "t1", AGENT)
    assert first is not None and first.attempt == 1 and first.agent_id == "agent-1"
    requeued = store.requeue(Attempt("t1", 1), RETRIES, NOW, "agent lost", Cause.LOST)
    second = _claim(store, "t1", OTHER)

    assert requeued.state is TaskState.QUEUED
    assert second is not None and second.attempt == 2 and second.agent_id == "agent-2"
    assert _claim(store, "t1", AGENT) is None


def test_claim_many_claims_only_queued_tasks_in_one_go(store: TaskStore) -> None:
    for task_id in ("t1", "t2", "t3", "t4"):
        store.create(task_id, "tenant", _spec(), NOW, None)
    _claim(store, "t2", OTHER)  # already running elsewhere
    store.cancel("t3", "tenant", NOW)

    claimed = store.claim_many(["t1", "t2", "t3", "t4", "missing"], AGENT, NOW)

    assert sorted(t.id for t in claimed) == ["t1", "t4"]
    assert all(t.attempt == 1 and t.agent_id == "agent-1" for t in claimed)
    assert store.get("t2").agent_id == "agent-2"
    assert store.claim_many(["t1", "t4"], OTHER, NOW) == []


def test_a_result_from_a_stale_attempt_is_refused_and_not_billed(
    store: TaskStore, engine: sa.Engine
) -> None:
    store.create("t1", "tenant", _spec(), NOW, None)
    _claim(store, "t1", AGENT)
    store.requeue(Attempt("t1", 1), RETRIES, NOW, "lost", Cause.LOST)
    _claim(store, "t1", OTHER)

    with pytest.raises(StaleAttemptError):
        store.succeed(_outcome("t1", 1), NOW)
    task = store.succeed(_outcome("t1", 2, "agent-2"), NOW + timedelta(seconds=5))

    assert task.state is TaskState.SUCCEEDED and task.compute_seconds == 90.0
    with engine.connect() as conn:
        rows = conn.execute(sa.select(usage)).all()
    assert len(rows) == 1
    assert rows[0]._mapping["agent_id"] == "agent-2" and rows[0]._mapping["attempt"] == 2
    assert rows[0]._mapping["cost_nanousd"] == 17_750_000


def test_a_task_cannot_succeed_twice(store: TaskStore, engine: sa.Engine) -> None:
    store.create("t1", "tenant", _spec(), NOW, None)
    _claim(store, "t1", AGENT)
    store.succeed(_outcome("t1", 1), NOW)

    with pytest.raises(StaleAttemptError):
        store.succeed(_outcome("t1", 1), NOW)

    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(usage)).scalar_one() == 1


def test_a_failed_billing_write_leaves_the_task_running(
    store: TaskStore, engine: sa.Engine
) -> None:
    store.create("t1", "tenant", _spec(), NOW, None)
    _claim(store, "t1", AgentInfo("a", "nvidia-unpriced", 1, 1, frozenset()))

    with pytest.raises(Exception, match="no on-demand price"):
        store.succeed(_outcome("t1", 1, "a"), NOW)

    assert store.get("t1").state is TaskState.RUNNING


def test_cancel_ends_live_tasks_and_leaves_final_ones(store: TaskStore) -> None:
    store.create("t1", "tenant", _spec(), NOW, None)
    store.create("t2", "tenant", _spec(), NOW, None)
    _claim(store, "t2", AGENT)
    store.succeed(_outcome("t2", 1), NOW)

    before, after = store.cancel("t1", "tenant", NOW)
    done_before, done_after = store.cancel("t2", "tenant", NOW)

    assert (before.state, after.state) == (TaskState.QUEUED, TaskState.CANCELLED)
    assert done_before.state is done_after.state is TaskState.SUCCEEDED


def test_expired_tasks_fail_with_deadline_exceeded(store: TaskStore) -> None:
    store.create("late", "tenant", _spec(), NOW, NOW + timedelta(seconds=1))
    store.create("fine", "tenant", _spec(), NOW, NOW + timedelta(hours=1))

    expired = store.expire(NOW + timedelta(seconds=2))

    assert [(b.id, a.state, a.error_code) for b, a in expired] == [
        ("late", TaskState.FAILED, FailureCode.DEADLINE_EXCEEDED)
    ]
    assert store.get("fine").state is TaskState.QUEUED


def test_recovery_requeues_running_tasks_in_submission_order(store: TaskStore) -> None:
    for task_id in ("a", "b", "c"):
        store.create(task_id, "tenant", _spec(), NOW, None)
    _claim(store, "b", AGENT)

    queued, cancelled = store.recover(NOW)

    assert [t.id for t in queued] == ["a", "b", "c"] and cancelled == []
    assert store.get("b").attempt == 1


def test_recovery_cancels_live_call_bound_tasks_and_keeps_the_rest(store: TaskStore) -> None:
    for task_id in ("queued-run", "running-run", "done-run"):
        store.create(task_id, "tenant", _spec(), NOW, None, call_bound=True)
    store.create("submitted", "tenant", _spec(), NOW, None)
    _claim(store, "running-run", AGENT)
    _claim(store, "done-run", AGENT)
    store.succeed(_outcome("done-run", 1), NOW)
    later = NOW + timedelta(minutes=5)

    queued, cancelled = store.recover(later)

    assert [t.id for t in queued] == ["submitted"]
    assert sorted(t.id for t in cancelled) == ["queued-run", "running-run"]
    for task_id in ("queued-run", "running-run"):
        task = store.get(task_id)
        assert task.state is TaskState.CANCELLED and task.call_bound
        assert task.finished_at == later and "call it belonged to ended" in (
            task.error_message or ""
        )
    assert store.get("done-run").state is TaskState.SUCCEEDED
    assert not store.get("submitted").call_bound


def test_pages_list_newest_first(store: TaskStore) -> None:
    for i in range(5):
        store.create(f"t{i}", "tenant", _spec(), NOW, None)

    first = store.page("tenant", [], 2, None)
    second = store.page("tenant", [], 2, first[-1].seq)

    assert [t.id for t in first + second] == ["t4", "t3", "t2", "t1"]
    assert store.page("tenant", [TaskState.RUNNING], 10, None) == []

"""Spool hygiene on SQLite and PostgreSQL: results expire and say so, orphaned files go after
their grace age, and a spool directory the database was not written with is named as such."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from gpubroker.billing.models import tasks
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.errors import PayloadLostError, ResultExpiredError
from gpubroker.broker.model import AgentInfo, Attempt, AttemptOutcome, Task, TaskSpec
from gpubroker.broker.storage.retention import RetentionPolicy, SpoolKeeper, SweepReport
from gpubroker.broker.storage.spool import INLINE_MAX_BYTES, Spool
from gpubroker.broker.storage.store import TaskStore
from gpubroker.protos.wire import TensorMeta

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
AGENT = AgentInfo("agent-1", "nvidia-l4", 1 << 30, 2, frozenset({"echo"}))
BIG = INLINE_MAX_BYTES + 1
POLICY = RetentionPolicy(result_ttl_s=3600, call_result_ttl_s=60, orphan_grace_s=600)


@pytest.fixture
def store(engine: sa.Engine) -> TaskStore:
    return TaskStore(engine, PriceCatalog.load(), billing=False)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.open()
    return spool


@pytest.fixture
def keeper(engine: sa.Engine, spool: Spool) -> SpoolKeeper:
    keeper = SpoolKeeper(engine, spool, POLICY)
    keeper.record_spool(NOW - timedelta(days=30))
    return keeper


def _succeeded(
    store: TaskStore, spool: Spool, task_id: str, nbytes: int, *, call_bound: bool = False
) -> Task:
    """A task that succeeded at NOW with ``nbytes`` of outputs (a spool file when large)."""
    meta = TensorMeta("uint8", (4,), 4, 1)
    spec = TaskSpec(workload="echo", inputs=(meta,), params={})
    store.create(task_id, "tenant", spec, NOW, None, b"abcd", call_bound=call_bound)
    (claimed,) = store.claim_many([task_id], AGENT, NOW)
    out = TensorMeta("uint8", (nbytes,), nbytes, 1)
    inline = None
    if nbytes > INLINE_MAX_BYTES:
        spool.output_path(task_id, claimed.attempt).write_bytes(b"x" * nbytes)
    else:
        inline = b"x" * nbytes
    outcome = AttemptOutcome(AGENT.agent_id, Attempt(task_id, claimed.attempt), outputs=(out,))
    return store.succeed(outcome, NOW, inline)


def _age(path: Path, seconds: float) -> Path:
    """Makes ``path`` look last written ``seconds`` before NOW."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(b"y" * 10)
    stamp = NOW.timestamp() - seconds
    os.utime(path, (stamp, stamp))
    return path


def _expired_at(engine: sa.Engine, task_id: str) -> datetime | None:
    with engine.connect() as conn:
        value: datetime | None = conn.execute(
            sa.select(tasks.c.outputs_expired_at).where(tasks.c.id == task_id)
        ).scalar_one()
    return value


async def test_a_submitted_tasks_result_expires_after_its_retention_and_says_when(
    store: TaskStore, spool: Spool, keeper: SpoolKeeper, engine: sa.Engine
) -> None:
    task = _succeeded(store, spool, "t-big", BIG)
    path = spool.output_path(task.id, task.attempt)

    early = await keeper.sweep(NOW + timedelta(seconds=3599))
    assert early.expired == 0 and path.exists()
    report = await keeper.sweep(NOW + timedelta(seconds=3601))

    assert report.expired == 1 and report.expired_bytes == BIG
    assert not path.exists()
    assert _expired_at(engine, task.id) == NOW + timedelta(seconds=3601)
    after = store.get(task.id)
    with pytest.raises(PayloadLostError) as lost:
        spool.outputs(after)
    error = await keeper.explain_missing(after, lost.value)
    assert isinstance(error, ResultExpiredError)
    assert "expired at 2026-12-01 13:00:01 UTC" in str(error)
    assert "kept for" in str(error)


async def test_an_inline_result_loses_its_bytes_from_the_row_when_it_expires(
    store: TaskStore, spool: Spool, keeper: SpoolKeeper
) -> None:
    task = _succeeded(store, spool, "t-small", 16)

    await keeper.sweep(NOW + timedelta(hours=2))

    after = store.get(task.id)
    assert task.inline_outputs is not None and after.inline_outputs is None


async def test_a_call_bound_result_expires_after_its_short_retention_or_once_delivered(
    store: TaskStore, spool: Spool, keeper: SpoolKeeper, engine: sa.Engine
) -> None:
    undelivered = _succeeded(store, spool, "t-run-1", 16, call_bound=True)
    delivered = _succeeded(store, spool, "t-run-2", BIG, call_bound=True)
    delivered_inline = _succeeded(store, spool, "t-run-3", 16, call_bound=True)

    keeper.delivered(delivered)
    keeper.delivered(delivered_inline)
    await keeper.flush_delivered()

    assert not spool.output_path(delivered.id, delivered.attempt).exists()
    assert _expired_at(engine, delivered.id) is not None
    assert _expired_at(engine, delivered_inline.id) is not None
    assert store.get(delivered_inline.id).inline_outputs is None
    assert _expired_at(engine, undelivered.id) is None
    report = await keeper.sweep(NOW + timedelta(seconds=61))
    assert report.expired == 1 and _expired_at(engine, undelivered.id) is not None
    with pytest.raises(PayloadLostError) as lost:
        spool.outputs(store.get(delivered.id))
    error = await keeper.explain_missing(store.get(delivered.id), lost.value)
    assert "kept only until they are delivered" in str(error)


async def test_orphans_older_than_the_grace_age_are_swept_and_needed_or_young_files_kept(
    store: TaskStore, spool: Spool, keeper: SpoolKeeper
) -> None:
    task = _succeeded(store, spool, "t-kept", BIG)
    kept_output = _age(spool.output_path(task.id, task.attempt), 3600)
    lost_attempt = _age(spool.output_path(task.id, task.attempt + 1), 3600)
    no_row_input = _age(spool.input_path("t-never-committed"), 3600)
    young_input = _age(spool.input_path("t-being-written"), 10)
    old_part = _age(spool.input_path("t-crashed").with_suffix(".bin.part"), 3600)
    finished_input = _age(spool.input_path(task.id), 3600)
    model_file = _age(spool.root / "models" / "abc.model", 3600)
    stranger = _age(spool.root / "in" / "README", 3600)

    report = await keeper.sweep(NOW)

    gone = [lost_attempt, no_row_input, old_part, finished_input]
    assert [p.exists() for p in gone] == [False] * 4
    assert kept_output.exists() and young_input.exists()
    assert model_file.exists() and stranger.exists()
    assert report.orphans == 4
    assert report.files == 3 and report.bytes == BIG + 20
    assert report.free_bytes > 0


async def test_the_inputs_of_a_queued_task_are_never_orphans(
    store: TaskStore, spool: Spool, keeper: SpoolKeeper
) -> None:
    meta = TensorMeta("uint8", (BIG,), BIG, 1)
    store.create(
        "t-queued", "tenant", TaskSpec(workload="echo", inputs=(meta,), params={}), NOW, None
    )
    inputs = _age(spool.input_path("t-queued"), 7200)

    await keeper.sweep(NOW)

    assert inputs.exists()


async def test_a_result_written_to_another_spool_directory_says_so(
    store: TaskStore, engine: sa.Engine, tmp_path: Path
) -> None:
    first = Spool(tmp_path / "first")
    first.open()
    SpoolKeeper(engine, first, POLICY).record_spool(NOW - timedelta(days=1))
    task = _succeeded(store, first, "t-moved", BIG)
    second = Spool(tmp_path / "second")
    second.open()
    keeper = SpoolKeeper(engine, second, POLICY)

    keeper.record_spool(NOW + timedelta(hours=1))
    with pytest.raises(PayloadLostError) as lost:
        second.outputs(task)
    error = await keeper.explain_missing(task, lost.value)

    assert isinstance(error, PayloadLostError)
    assert f"written to spool directory {tmp_path / 'first'}" in str(error)
    assert "not the one this database was written with" in str(error)
    assert "crashed" not in str(error)


async def test_a_genuinely_lost_result_is_reported_as_lost(
    store: TaskStore, spool: Spool, keeper: SpoolKeeper
) -> None:
    task = _succeeded(store, spool, "t-lost", BIG)
    spool.output_path(task.id, task.attempt).unlink()

    with pytest.raises(PayloadLostError) as lost:
        spool.outputs(task)
    error = await keeper.explain_missing(task, lost.value)

    assert error is lost.value
    assert "deleted or its disk lost it" in str(error)


async def test_a_spool_written_with_another_database_is_not_swept(
    engine: sa.Engine, tmp_path: Path
) -> None:
    foreign = Spool(tmp_path / "foreign")
    foreign.open()  # its marker was written "by another database"
    foreign = Spool(tmp_path / "foreign")
    foreign.open()
    orphan = _age(foreign.input_path("t-other-db"), 7200)
    keeper = SpoolKeeper(engine, foreign, POLICY)

    keeper.record_spool(NOW)
    report = await keeper.sweep(NOW)

    assert not keeper.sweeps_orphans
    assert orphan.exists() and report.orphans == 0


async def test_each_sweep_is_reported_to_its_listener(engine: sa.Engine, spool: Spool) -> None:
    reports: list[SweepReport] = []
    keeper = SpoolKeeper(engine, spool, POLICY, on_sweep=reports.append)
    keeper.record_spool(NOW)
    _age(spool.input_path("t-orphan"), 7200)

    await keeper.sweep(NOW)

    assert [(r.orphans, r.orphan_bytes) for r in reports] == [(1, 10)]

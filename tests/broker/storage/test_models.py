"""Model rows and the task columns of model tasks, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from gpubroker.billing.models import usage
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.errors import ModelInUseError, ModelNotFoundError
from gpubroker.broker.model import (
    AgentInfo,
    Attempt,
    AttemptOutcome,
    GpuRequirement,
    ModelRecord,
    TaskSpec,
)
from gpubroker.broker.storage.store import TaskStore
from gpubroker.protos.modelfile import workload_for
from gpubroker.protos.wire import TensorMeta

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
MODEL = "ab" * 32
AGENT = AgentInfo("agent-1", "nvidia-l4", 1 << 30, 2, frozenset(), runs_models=True)
META = TensorMeta("float32", (2, 8), 64, 1)


@pytest.fixture
def store(engine: sa.Engine) -> TaskStore:
    return TaskStore(engine, PriceCatalog.load())


def _record(tenant: str = "tenant-a", model_id: str = MODEL, **changes: object) -> ModelRecord:
    record = ModelRecord(
        tenant=tenant,
        model_id=model_id,
        name="mlp",
        size_bytes=1234,
        metadata={"inputs": [{"dtype": "float32", "shape": [None, 8]}], "batch_dim_varies": True},
        created_at=NOW,
        max_batch_size=32,
        max_queue_delay_s=0.005,
        requires=GpuRequirement("nvidia-l4", 8 << 30),
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def _model_spec(request_id: str | None = None) -> TaskSpec:
    return TaskSpec(workload_for(MODEL), (META,), request_id=request_id)


def test_a_model_row_reads_back_as_it_was_written(store: TaskStore) -> None:
    store.add_model(_record())

    assert store.models() == [_record()]


def test_a_model_rows_options_are_updated_in_place(store: TaskStore) -> None:
    store.add_model(_record())

    store.update_model(_record(name="renamed", max_batch_size=0, requires=GpuRequirement()))

    assert store.models() == [_record(name="renamed", max_batch_size=0, requires=GpuRequirement())]


def test_updating_a_model_nobody_holds_is_not_found(store: TaskStore) -> None:
    with pytest.raises(ModelNotFoundError, match=f"no model {MODEL}"):
        store.update_model(_record())


def test_a_task_naming_a_model_its_tenant_does_not_hold_is_refused(store: TaskStore) -> None:
    store.add_model(_record(tenant="tenant-a"))

    with pytest.raises(ModelNotFoundError, match=f"^no model {MODEL}$"):
        store.create("t1", "tenant-b", _model_spec(), NOW, None)

    store.create("t2", "tenant-a", _model_spec(), NOW, None)
    assert [t.id for t in store.page("tenant-a", (), 10, None)] == ["t2"]


def test_a_delete_is_refused_while_a_queued_or_running_task_names_the_model(
    store: TaskStore,
) -> None:
    store.add_model(_record())
    store.create("t1", "tenant-a", _model_spec(), NOW, None)
    store.create("t2", "tenant-a", _model_spec(), NOW, None)
    store.claim_many(["t2"], AGENT, NOW)

    with pytest.raises(ModelInUseError, match="named by 2 queued or running tasks"):
        store.delete_model("tenant-a", MODEL)

    assert store.models() == [_record()]


def test_a_delete_after_the_tasks_ended_removes_the_row(store: TaskStore) -> None:
    store.add_model(_record())
    store.create("t1", "tenant-a", _model_spec(), NOW, None)
    store.cancel("t1", "tenant-a", NOW)

    deleted, unreferenced = store.delete_model("tenant-a", MODEL)

    assert deleted == _record()
    assert unreferenced
    assert store.models() == []


def test_the_file_stays_referenced_while_another_tenant_holds_the_same_model(
    store: TaskStore,
) -> None:
    store.add_model(_record(tenant="tenant-a"))
    store.add_model(_record(tenant="tenant-b"))
    store.create("t1", "tenant-b", _model_spec(), NOW, None)  # b's task does not hold a's row

    _, unreferenced = store.delete_model("tenant-a", MODEL)

    assert not unreferenced
    assert [m.tenant for m in store.models()] == ["tenant-b"]


def test_deleting_another_tenants_model_is_not_found(store: TaskStore) -> None:
    store.add_model(_record(tenant="tenant-a"))

    with pytest.raises(ModelNotFoundError, match=f"^no model {MODEL}$"):
        store.delete_model("tenant-b", MODEL)


def test_a_retried_submit_gets_its_task_even_after_the_model_is_gone(store: TaskStore) -> None:
    store.add_model(_record())
    first, _ = store.create("t1", "tenant-a", _model_spec("r1"), NOW, None)
    store.cancel("t1", "tenant-a", NOW)
    store.delete_model("tenant-a", MODEL)

    again, deduplicated = store.create("t2", "tenant-a", _model_spec("r1"), NOW, None)

    assert deduplicated and again.id == first.id


def test_a_tasks_requirement_is_stored_and_read_back(store: TaskStore) -> None:
    spec = TaskSpec("echo", (META,), requires=GpuRequirement("nvidia-a100", 40 << 30))

    created, _ = store.create("t1", "tenant-a", spec, NOW, None)

    assert created.requires == spec.requires
    assert store.get("t1").requires == spec.requires
    assert store.claim_many(["t1"], AGENT, NOW)[0].requires == spec.requires


@pytest.mark.parametrize("keep_running", [True, False], ids=["kept-snapshot", "read-back"])
def test_a_model_success_records_load_time_and_batch_but_bills_only_compute(
    store: TaskStore, engine: sa.Engine, keep_running: bool
) -> None:
    store.add_model(_record())
    store.create("t1", "tenant-a", _model_spec(), NOW, None)
    running = store.claim_many(["t1"], AGENT, NOW)[0]
    outcome = AttemptOutcome(
        "agent-1",
        Attempt("t1", 1),
        outputs=(META,),
        compute_seconds=2.0,
        model_load_seconds=30.0,
        batch_tasks=3,
    )

    succeeded = store.succeed(outcome, NOW, b"x" * 64, running if keep_running else None)

    assert (succeeded.model_load_seconds, succeeded.batch_tasks) == (30.0, 3)
    assert (store.get("t1").model_load_seconds, store.get("t1").batch_tasks) == (30.0, 3)
    with engine.connect() as conn:
        billed = conn.execute(sa.select(usage.c.compute_seconds)).scalar_one()
    assert billed == 2.0


def test_an_operator_success_has_no_model_fields(store: TaskStore) -> None:
    store.create("t1", "tenant-a", TaskSpec("echo", (META,)), NOW, None)
    store.claim_many(["t1"], AGENT, NOW)

    store.succeed(AttemptOutcome("agent-1", Attempt("t1", 1), (META,), 1.0), NOW, b"x" * 64)

    task = store.get("t1")
    assert (task.model_load_seconds, task.batch_tasks) == (None, None)

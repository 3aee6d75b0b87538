"""Where each attempt ran and how it ended (``task_attempts``), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from gpubroker.billing.prices import PriceCatalog
from gpubroker.billing.vms import VmLaunch, record_created
from gpubroker.broker.model import AgentInfo, Attempt, TaskSpec
from gpubroker.broker.storage.store import TaskStore
from gpubroker.broker.storage.transitions import Cause, Retries
from gpubroker.protos.states import FailureCode
from gpubroker.protos.wire import TensorMeta

T0 = datetime(2027, 1, 5, 12, 0, tzinfo=UTC)
DESK = AgentInfo("desk", "cpu", 0, 1, frozenset({"echo"}))
VM = AgentInfo("gpubroker-l4-1", "nvidia-l4", 1 << 34, 1, frozenset({"echo"}))
RETRIES = Retries(max_attempts=3, max_lost_attempts=3)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def store(engine: sa.Engine) -> TaskStore:
    store = TaskStore(engine, PriceCatalog.load())
    spec = TaskSpec(workload="echo", inputs=(TensorMeta("uint8", (1,), 1, 1),))
    store.create("t1", "tenant", spec, T0, None)
    launch = VmLaunch("gpubroker-l4-1", "gce", "us-central1-a", "nvidia-l4", "g2-standard-4",
                      True, 280_000_000, "2026-11-01")  # fmt: skip
    record_created(engine, launch, T0)
    return store


def test_each_attempt_names_its_agent_machine_and_end(store: TaskStore) -> None:
    (first,) = store.claim_many(["t1"], DESK, at(1))
    store.requeue(Attempt("t1", 1), RETRIES, at(2), "corrupt result", Cause.REJECTED)
    store.claim_many(["t1"], VM, at(3))
    running = store.get("t1")
    during = store.attempts([running])["t1"]
    store.fail(Attempt("t1", 2), VM.agent_id, FailureCode.INVALID_ARGUMENT, "bad shape", at(4))
    failed = store.get("t1")

    after = store.attempts([failed])["t1"]

    assert first.attempt == 1
    assert [(a.number, a.agent_id, a.machine_name, a.outcome) for a in during] == [
        (1, "desk", "", "rejected"),
        (2, "gpubroker-l4-1", "gpubroker-l4-1", "running"),
    ]
    assert during[1].ended_at is None
    assert (after[0].started_at, after[0].ended_at, after[0].detail) == (
        at(1), at(2), "corrupt result",
    )  # fmt: skip
    assert (after[1].outcome, after[1].ended_at, after[1].detail) == ("failed", at(4), "bad shape")
    assert after[1].gpu_type == "nvidia-l4"


def test_a_broker_restart_ends_running_attempts_as_lost(store: TaskStore) -> None:
    store.claim_many(["t1"], DESK, at(1))

    queued, _ = store.recover(at(5))
    store.claim_many(["t1"], DESK, at(6))
    history = store.attempts([store.get("t1")])["t1"]

    assert [t.id for t in queued] == ["t1"]
    assert [(a.number, a.outcome, a.ended_at) for a in history] == [
        (1, "lost", at(5)),
        (2, "running", None),
    ]
    assert history[0].detail == "the broker restarted"


def test_a_task_never_claimed_has_no_attempts(store: TaskStore) -> None:
    assert store.attempts([store.get("t1")]) == {}

"""Group commit: concurrent store calls share one transaction without sharing their failures."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.errors import RequestConflictError
from gpubroker.broker.model import AgentInfo, Attempt, AttemptOutcome, TaskSpec, TaskState
from gpubroker.broker.storage.async_store import AsyncTaskStore
from gpubroker.broker.storage.store import TaskStore
from gpubroker.protos.wire import TensorMeta

NOW = datetime(2026, 11, 24, tzinfo=UTC)


class CountingStore(TaskStore):
    """Counts transactions, to see batching from the outside."""

    batches = 0

    def run_batch(self, ops):  # type: ignore[no-untyped-def]
        self.batches += 1
        return super().run_batch(ops)


def _spec(request_id: str, nbytes: int = 4) -> TaskSpec:
    return TaskSpec("echo", (TensorMeta("uint8", (nbytes,), nbytes, 0),), request_id=request_id)


async def test_concurrent_calls_commit_together_and_a_failing_one_fails_alone(
    engine: sa.Engine,
) -> None:
    sync = CountingStore(engine, PriceCatalog.load())
    sync.create("first", "t", _spec("dup"), NOW, None)
    store = AsyncTaskStore(sync)

    results = await asyncio.gather(
        *(store.create(f"task-{i}", "t", _spec(f"r{i}"), NOW, None) for i in range(20)),
        store.create("clash", "t", _spec("dup", nbytes=8), NOW, None),
        return_exceptions=True,
    )
    await store.close()

    assert isinstance(results[-1], RequestConflictError)
    assert all(not isinstance(r, BaseException) for r in results[:-1])
    assert len(sync.page("t", [], 100, None)) == 21
    assert sync.batches < 21


async def test_an_unexpected_error_rolls_back_only_its_own_operation(engine: sa.Engine) -> None:
    sync = TaskStore(engine, PriceCatalog.load())
    unpriced = AgentInfo("a", "nvidia-unpriced", 1, 1, frozenset())
    priced = AgentInfo("b", "cpu", 1, 1, frozenset())
    for task_id, agent in (("bad", unpriced), ("good", priced)):
        sync.create(task_id, "t", _spec(task_id), NOW, None)
        sync.claim_many([task_id], agent, NOW)
    store = AsyncTaskStore(sync)
    outcome = {
        n: AttemptOutcome(a, Attempt(n, 1), (), 1.0) for n, a in (("bad", "a"), ("good", "b"))
    }

    bad, good = await asyncio.gather(
        store.succeed(outcome["bad"], NOW),
        store.succeed(outcome["good"], NOW),
        return_exceptions=True,
    )
    await store.close()

    assert isinstance(bad, Exception) and "no on-demand price" in str(bad)
    assert not isinstance(good, BaseException) and good.state is TaskState.SUCCEEDED
    assert sync.get("bad").state is TaskState.RUNNING
    with pytest.raises(Exception, match="no on-demand price"):
        sync.succeed(outcome["bad"], NOW)

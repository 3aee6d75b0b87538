"""What the usage ledger costs per task inside the broker's store, measured in one process.

The system-level A/B (two brokers, ledger on and off) moves by several percent between runs
on these shared cores; this isolates the ledger's own work so the figure does not drown in
that noise. Two stores on SQLite files, ledger on and off, take the same batches the
async store groups in production (50 creates, one claim, 50 successes, each batch one
transaction) and the CPU time of each phase is compared, alternating between the stores.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

from gpubroker.billing.migrate import upgrade
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.model import AgentInfo, Attempt, AttemptOutcome, TaskSpec
from gpubroker.broker.storage import usage
from gpubroker.broker.storage.engine import create_engine
from gpubroker.broker.storage.store import TaskStore
from gpubroker.protos.ids import time_ordered_id
from gpubroker.protos.wire import TensorMeta, crc32c

__all__ = ["ledger_cost_us"]

_R = TypeVar("_R")

BATCH = 50
_DATA = bytes(16)
_META = TensorMeta("float32", (4,), 16, crc32c(_DATA))
_AGENT = AgentInfo("bench-agent", "cpu", 0, 8, frozenset({"echo"}))


def _store(root: Path, billing: bool) -> TaskStore:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    engine = create_engine(f"sqlite:///{root / 'broker.sqlite'}")
    upgrade(engine)
    return TaskStore(engine, PriceCatalog.load(), billing=billing)


def _lifecycle_us(store: TaskStore, tasks: int) -> float:
    """CPU microseconds per task to create, claim and succeed ``tasks`` tasks in batches."""
    now = datetime.now(UTC)
    spent = 0.0
    for _ in range(tasks // BATCH):
        ids = [time_ordered_id() for _ in range(BATCH)]
        started = time.process_time()
        store.run_batch(
            [
                lambda t=t: store.create(  # type: ignore[misc]
                    t, "tenant-a", TaskSpec("echo", (_META,), request_id=time_ordered_id()),
                    now, None, _DATA,
                )
                for t in ids
            ]
        )  # fmt: skip
        claimed = store.claim_many(ids, _AGENT, now)
        outcomes = [
            AttemptOutcome(_AGENT.agent_id, Attempt(t.id, t.attempt), (_META,), 1e-4)
            for t in claimed
        ]
        store.run_batch([lambda o=o: store.succeed(o, now, _DATA) for o in outcomes])  # type: ignore[misc]
        spent += time.process_time() - started
    return spent / tasks * 1e6


def ledger_cost_us(root: Path, tasks: int = 4000, reps: int = 7) -> tuple[float, float, float]:
    """(CPU us per task with the ledger, without it, and inside the ledger's own calls).

    The first two are medians over alternating runs; their difference is what billing costs
    the store, commit included, but on these shared cores it moves by tens of microseconds
    between runs. The third times only the calls the ledger adds (``usage_record``, then
    ``priced_usage`` and the batch's ``insert_usage``, or ``record_usage`` outside a batch) in
    the runs with it, which is steady.
    """
    stores = {True: _store(root / "ledger-on", True), False: _store(root / "ledger-off", False)}
    runs: dict[bool, list[float]] = {True: [], False: []}
    inside: list[float] = []
    _lifecycle_us(stores[True], BATCH * 4)  # warm both: statement caches, the files
    _lifecycle_us(stores[False], BATCH * 4)
    for i in range(reps):
        for billing in (True, False) if i % 2 == 0 else (False, True):
            if not billing:
                runs[billing].append(_lifecycle_us(stores[billing], tasks))
                continue
            timer = _CpuTimer()
            with contextlib.ExitStack() as patches:
                for module, name in _LEDGER_CALLS:
                    timed = timer.wrap(getattr(module, name))
                    patches.enter_context(mock.patch.object(module, name, timed))
                runs[billing].append(_lifecycle_us(stores[billing], tasks))
            inside.append(timer.seconds / tasks * 1e6)
    return statistics.median(runs[True]), statistics.median(runs[False]), statistics.median(inside)


_LEDGER_CALLS = (
    (usage, "usage_record"),
    (usage, "priced_usage"),
    (usage, "insert_usage"),
    (usage, "record_usage"),
)
"""What billing adds to a success: building the record; pricing and inserting it."""


class _CpuTimer:
    """Adds up the CPU time spent inside the functions it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., _R]) -> Callable[..., _R]:
        def timed(*args: Any, **kwargs: Any) -> _R:
            started = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - started

        return timed

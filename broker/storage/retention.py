"""Spool hygiene: results expire, orphaned payload files go, the spool's directory is known.

``SpoolKeeper`` runs a sweep at start and every ``RetentionPolicy.sweep_interval_s``:

- **Results expire.** A final task's outputs are deleted ``result_ttl_s`` after it finished
  (``call_result_ttl_s`` for a call-bound task that nobody fetched). A call-bound task's
  result that reached its caller (``Run``, ``RunMany``, ``GetResult``) is expired within
  ``DELIVERED_FLUSH_S`` of delivery (``delivered``), many in one statement. The row
  keeps the moment (``tasks.outputs_expired_at``) and loses its inline bytes, so ``GetResult``
  can answer that the result expired, and when.
- **Orphans go.** A payload file that no row needs (the broker killed between writing a file
  and committing its row, the outputs of an attempt that lost, a ``.part`` file) is deleted
  once older than ``orphan_grace_s``: a file being written now is never taken.
- **The spool's directory is known.** The database records the id in the directory's marker
  file each time it changes (table ``spools``). A result missing because the broker was
  started with another directory then says so, and a directory written with another database
  is never swept of "orphans" in the process that first meets it.

The SQL here is small and runs on worker threads, beside the store's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gpubroker.billing.models import spools, tasks
from gpubroker.broker.errors import BrokerError, PayloadLostError, ResultExpiredError
from gpubroker.broker.model import Task, TaskState
from gpubroker.broker.storage.spool import PayloadFile, Spool

__all__ = ["RetentionPolicy", "SpoolEra", "SpoolKeeper", "SweepReport"]

logger = logging.getLogger(__name__)

_FINAL = tuple(s.value for s in TaskState if s.is_final)
_LIVE = (TaskState.QUEUED.value, TaskState.RUNNING.value)
_BATCH = 500
"""Rows per statement: bounds an IN list and how long one sweep holds a write lock."""
DELIVERED_FLUSH_S = 1.0
"""A delivered ``Run``/``map`` result is deleted at most this long after delivery: the results
delivered meanwhile go in one statement, rather than a write per small task."""


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long results stay and how often the spool is swept."""

    result_ttl_s: float = 7 * 24 * 3600.0
    """A submitted task's outputs are deleted this long after it finished (7 days)."""
    call_result_ttl_s: float = 600.0
    """A ``Run``/``map`` task's outputs, if never fetched, are deleted this long after it
    finished; a delivered file goes at once."""
    sweep_interval_s: float = 300.0
    """Seconds between sweeps (the first runs at start)."""
    orphan_grace_s: float = 3600.0
    """A file no row needs is deleted only once it is this old."""

    def __post_init__(self) -> None:
        values = (self.result_ttl_s, self.call_result_ttl_s, self.orphan_grace_s)
        if min(values) < 0 or not self.sweep_interval_s > 0:
            raise ValueError(
                f"retention times must be >= 0 and the sweep interval positive: {self}"
            )


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep did and found."""

    expired: int = 0
    """Tasks whose outputs expired."""
    expired_bytes: int = 0
    """Bytes of expired output files deleted."""
    orphans: int = 0
    """Orphaned files deleted."""
    orphan_bytes: int = 0
    files: int = 0
    """Files in the spool after the sweep."""
    bytes: int = 0
    """Their bytes."""
    free_bytes: int = 0
    """Free bytes on the spool's filesystem."""


@dataclass(frozen=True, slots=True)
class SpoolEra:
    """One spool directory the broker ran with, from ``started_at`` on."""

    spool_id: str
    path: str
    started_at: datetime


class SpoolKeeper:
    """Expires results, sweeps orphans and reports the spool's size (see the module doc)."""

    def __init__(
        self,
        engine: Engine,
        spool: Spool,
        policy: RetentionPolicy,
        on_sweep: Callable[[SweepReport], None] | None = None,
    ) -> None:
        self._engine = engine
        self._spool = spool
        self.policy = policy
        self._on_sweep = on_sweep
        self.eras: list[SpoolEra] = []
        """The spool directories this database was written with, oldest first."""
        self._delivered: list[Task] = []
        """Call-bound tasks whose results reached their callers, not yet expired."""
        self._flush_task: asyncio.Task[None] | None = None
        self.sweeps_orphans = True
        """False when the spool was written with another database (see the module doc)."""
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Records the spool's identity, then sweeps now and every interval."""
        await asyncio.to_thread(self.record_spool, datetime.now(UTC))
        self._loop_task = asyncio.create_task(self._loop(), name="spool-keeper")
        self._flush_task = asyncio.create_task(self._flush_loop(), name="spool-delivered")

    async def stop(self) -> None:
        """Stops the periodic sweep, then expires the results delivered since the last flush."""
        for task in (self._loop_task, self._flush_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.flush_delivered()

    def delivered(self, task: Task) -> None:
        """Notes that a ``Run``/``map`` task's result reached its caller: its outputs (in the
        row or a file) are deleted and the row marked expired within ``DELIVERED_FLUSH_S``.
        A submitted task's result is kept for its retention, whoever fetched it."""
        if task.call_bound:
            self._delivered.append(task)

    async def flush_delivered(self) -> None:
        """Expires every result noted as delivered, in one transaction."""
        if self._delivered:
            delivered, self._delivered = self._delivered, []
            await asyncio.to_thread(self._expire_many, delivered, datetime.now(UTC))

    def record_spool(self, now: datetime) -> None:
        """Adds the spool to the database's history when it differs from the last one there
        (blocking); a change is logged."""
        spool = self._spool
        with self._engine.begin() as conn:
            eras = _eras(conn)
            changed = not eras or eras[-1].spool_id != spool.identity
            if changed:
                conn.execute(
                    spools.insert().values(
                        spool_id=spool.identity, path=str(spool.root), started_at=now
                    )
                )
        if eras and changed:
            logger.warning(
                "spool directory %s is not the one this database was last written with (%s): "
                "payloads stored there are not reachable from this broker",
                spool.root,
                eras[-1].path,
            )
        if not spool.marker_was_new and spool.identity not in {e.spool_id for e in eras}:
            self.sweeps_orphans = False
            logger.warning(
                "spool directory %s was written with another database: no orphaned files are "
                "swept from it until the broker restarts",
                spool.root,
            )
        if changed:
            eras.append(SpoolEra(spool.identity, str(spool.root), now))
        self.eras = eras

    async def sweep(self, now: datetime | None = None) -> SweepReport:
        """Expires due results, deletes orphans, measures the spool; logs and reports it."""
        report = await asyncio.to_thread(self._sweep, now or datetime.now(UTC))
        if report.expired or report.orphans:
            logger.info(
                "spool sweep: %d results expired (%d bytes), %d orphaned files removed "
                "(%d bytes); %d files, %d bytes left, %d bytes free",
                report.expired,
                report.expired_bytes,
                report.orphans,
                report.orphan_bytes,
                report.files,
                report.bytes,
                report.free_bytes,
            )
        if self._on_sweep is not None:
            self._on_sweep(report)
        return report

    async def explain_missing(self, task: Task, lost: PayloadLostError) -> BrokerError:
        """Why a succeeded task's outputs are not there: they expired, they were written to
        another spool directory, or ``lost`` (they are genuinely gone)."""
        expired_at = await asyncio.to_thread(self._expired_at, task.id)
        if expired_at is not None:
            return ResultExpiredError(
                f"the result of task {task.id} expired at {expired_at:%Y-%m-%d %H:%M:%S} UTC "
                f"and was deleted: {self._kept_for(task)}"
            )
        era = self.era_at(task.finished_at)
        if era is not None and era.spool_id != self._spool.identity:
            return PayloadLostError(
                f"the result of task {task.id} was written to spool directory {era.path}, but "
                f"this broker runs with spool directory {self._spool.root}, which is not the "
                "one this database was written with; start the broker with --spool-dir "
                f"{era.path} (GPUBROKER_SPOOL_DIR) to reach it"
            )
        return lost

    def era_at(self, when: datetime | None) -> SpoolEra | None:
        """The spool directory in use at ``when`` (None: before any was recorded)."""
        if when is None:
            return None
        found = None
        for era in self.eras:
            if era.started_at <= when:
                found = era
        return found

    def _kept_for(self, task: Task) -> str:
        if task.call_bound:
            return "results of Run and map calls are kept only until they are delivered"
        days = self.policy.result_ttl_s / 86400
        return (
            f"results of submitted tasks are kept for {days:g} days after they finish "
            "(--result-ttl, GPUBROKER_RESULT_TTL_S)"
        )

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(DELIVERED_FLUSH_S)
            try:
                await self.flush_delivered()
            except Exception:  # the periodic sweep expires them later
                logger.exception("expiring delivered results failed")

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                logger.exception("spool sweep failed; the next one runs in %gs", self._interval)
            await asyncio.sleep(self._interval)

    @property
    def _interval(self) -> float:
        return self.policy.sweep_interval_s

    # -- on a worker thread ---------------------------------------------------------------------

    def _sweep(self, now: datetime) -> SweepReport:
        expired, expired_bytes = self._expire_due(now)
        files = list(self._spool.files())
        orphans: list[PayloadFile] = []
        if self.sweeps_orphans:
            cutoff = now.timestamp() - self.policy.orphan_grace_s
            old = [f for f in files if f.mtime <= cutoff and (f.task_id or f.is_partial)]
            orphans = self._orphans(old)
            for f in orphans:
                f.path.unlink(missing_ok=True)
        gone = {f.path for f in orphans}
        left = [f for f in files if f.path not in gone]
        return SweepReport(
            expired=expired,
            expired_bytes=expired_bytes,
            orphans=len(orphans),
            orphan_bytes=sum(f.size for f in orphans),
            files=len(left),
            bytes=sum(f.size for f in left),
            free_bytes=self._spool.free_bytes(),
        )

    def _expire_due(self, now: datetime) -> tuple[int, int]:
        """Marks every final task past its retention expired, then deletes its output file."""
        p = self.policy
        due = sa.or_(
            sa.and_(
                sa.not_(tasks.c.call_bound),
                tasks.c.finished_at <= now - timedelta(seconds=p.result_ttl_s),
            ),
            sa.and_(
                tasks.c.call_bound,
                tasks.c.finished_at <= now - timedelta(seconds=p.call_result_ttl_s),
            ),
        )
        query = (
            sa.select(tasks.c.id, tasks.c.attempt, tasks.c.state)
            .where(tasks.c.outputs_expired_at.is_(None), due, tasks.c.state.in_(_FINAL))
            .limit(_BATCH)
        )
        count = deleted_bytes = 0
        while True:
            with self._engine.begin() as conn:
                rows = conn.execute(query).all()
                _mark_expired(conn, [row.id for row in rows], now)
            for row in rows:
                if row.state == TaskState.SUCCEEDED.value:
                    deleted_bytes += _unlink(self._spool.output_path(row.id, row.attempt))
            count += len(rows)
            if len(rows) < _BATCH:
                return count, deleted_bytes

    def _expire_many(self, delivered: list[Task], now: datetime) -> None:
        with self._engine.begin() as conn:
            for start in range(0, len(delivered), _BATCH):
                _mark_expired(conn, [t.id for t in delivered[start : start + _BATCH]], now)
        for task in delivered:
            if task.inline_outputs is None:
                _unlink(self._spool.output_path(task.id, task.attempt))

    def _expired_at(self, task_id: str) -> datetime | None:
        with self._engine.connect() as conn:
            value: datetime | None = conn.execute(
                sa.select(tasks.c.outputs_expired_at).where(tasks.c.id == task_id)
            ).scalar_one_or_none()
        return value

    def _orphans(self, files: list[PayloadFile]) -> list[PayloadFile]:
        """The files among ``files`` that no row needs."""
        ids = sorted({f.task_id for f in files if f.task_id})
        rows: dict[str, Any] = {}
        with self._engine.connect() as conn:
            for start in range(0, len(ids), _BATCH):
                chunk = ids[start : start + _BATCH]
                query = sa.select(
                    tasks.c.id, tasks.c.state, tasks.c.attempt, tasks.c.outputs_expired_at
                ).where(tasks.c.id.in_(chunk))
                rows.update((row.id, row) for row in conn.execute(query))
        return [f for f in files if f.is_partial or not _needed(f, rows.get(f.task_id))]


def _needed(f: PayloadFile, row: Any | None) -> bool:
    """Inputs are needed while their task is live; outputs while they are its current, not
    yet expired result."""
    if row is None:
        return False
    if f.attempt is None:
        return row.state in _LIVE
    return (
        row.state == TaskState.SUCCEEDED.value
        and row.attempt == f.attempt
        and row.outputs_expired_at is None
    )


def _eras(conn: Connection) -> list[SpoolEra]:
    rows = conn.execute(sa.select(spools).order_by(spools.c.seq))
    return [SpoolEra(row.spool_id, row.path, row.started_at) for row in rows]


def _mark_expired(conn: Connection, ids: Iterable[str], now: datetime) -> None:
    ids = list(ids)
    if ids:
        conn.execute(
            tasks.update()
            .where(tasks.c.id.in_(ids), tasks.c.outputs_expired_at.is_(None))
            .values(outputs_expired_at=now, inline_outputs=None)
        )


def _unlink(path: Path) -> int:
    """Deletes ``path``; returns the bytes it held (0 when it was not there)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size

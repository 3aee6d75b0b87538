"""The broker's only blocking boundary for SQL: one database thread, with group commit.

Calls from the event loop queue up while the thread is busy; the next round runs all of them
in one transaction (``TaskStore.run_batch``), so eight concurrent submits cost one commit and
one fsync instead of eight. A caller's future resolves only after its batch has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar, cast

from gpubroker.broker.storage.store import TaskStore

__all__ = ["MAX_BATCH", "AsyncTaskStore"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

MAX_BATCH = 256
"""Most operations in one transaction: bounds how long one commit holds the others."""


class AsyncTaskStore:
    """Runs ``TaskStore`` methods on one dedicated thread, batching concurrent calls."""

    def __init__(self, store: TaskStore) -> None:
        self.sync = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-store")
        self._pending: list[tuple[Callable[[], object], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def call(self, method: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Runs ``method`` (a ``TaskStore`` method) in the next batch; returns after commit."""
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="task-store")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((functools.partial(method, *args, **kwargs), future))
        self._wake.set()
        return cast(_T, await future)

    async def close(self) -> None:
        """Finishes queued calls, then stops the database thread."""
        if self._writer is not None:
            while self._pending:
                await asyncio.sleep(0.01)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        self._executor.shutdown(wait=True)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                ops = [op for op, _ in batch]
                try:
                    results = await loop.run_in_executor(self._executor, self.sync.run_batch, ops)
                except Exception as exc:  # a lone operation failed: hand it its error
                    results = [exc]
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

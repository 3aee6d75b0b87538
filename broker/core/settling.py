"""Work that runs to its end although the call that started it is cancelled.

A change the broker commits to its database is usually followed by a change to memory or files
(the queue, a lease, a model's record and file). When a peer hangs up between the two, gRPC
cancels its call, and a cancelled coroutine would leave the row saying one thing and memory
another. ``Settler.settle`` runs such work as its own task, shielded: the caller still sees its
cancellation, the work goes on, and ``wait`` lets a shutdown finish what is still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Settler"]

_T = TypeVar("_T")


class Settler:
    """Runs commits and their follow-ups to their end, whatever happens to their callers."""

    def __init__(self) -> None:
        self._running: set[asyncio.Future[Any]] = set()

    async def settle(
        self, work: Coroutine[Any, Any, _T], done: Callable[[], None] | None = None
    ) -> _T:
        """Runs ``work`` to its end even if this call is cancelled; ``done`` is called once it
        has ended, however it ended."""
        settling = asyncio.ensure_future(work)
        self._running.add(settling)
        settling.add_done_callback(self._running.discard)
        if done is not None:
            settling.add_done_callback(lambda _: done())
        return await asyncio.shield(settling)

    async def wait(self) -> None:
        """Waits until every work settling now has ended."""
        if self._running:
            await asyncio.wait(list(self._running))

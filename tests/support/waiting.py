"""Waiting on a condition with a deadline, instead of sleeping a fixed time and hoping.

A test that needs something to have happened polls for it with ``wait_for`` (in a coroutine)
or ``wait_until`` (in a thread); on timeout the test fails with what it waited for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def _timed_out(timeout: float, what: str, predicate: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


async def wait_for(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    what: str = "",
    *,
    interval: float = 0.01,
) -> None:
    """Polls ``predicate`` until it is truthy, letting the event loop run in between.

    Raises AssertionError naming ``what`` (or the predicate) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, predicate)
        await asyncio.sleep(interval)


async def wait_for_async(
    predicate: Callable[[], Awaitable[object]],
    timeout: float = 10.0,
    what: str = "",
    *,
    interval: float = 0.01,
) -> None:
    """``wait_for`` for a predicate that must be awaited (one that asks a server, say)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, predicate)
        await asyncio.sleep(interval)


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    what: str = "",
    *,
    interval: float = 0.05,
) -> None:
    """The blocking twin of ``wait_for``, for threads and synchronous tests."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, predicate)
        time.sleep(interval)

"""Work that runs to its end although its caller is cancelled (``Settler``)."""

from __future__ import annotations

import asyncio

import pytest

from gpubroker.broker.core.settling import Settler


async def test_work_goes_on_after_its_caller_is_cancelled_and_done_is_called_after_it() -> None:
    settler, release, events = Settler(), asyncio.Event(), []

    async def commit_then_follow_up() -> str:
        events.append("committed")
        await release.wait()
        events.append("followed up")
        return "ok"

    caller = asyncio.create_task(
        settler.settle(commit_then_follow_up(), lambda: events.append("done"))
    )
    async with asyncio.timeout(5):
        while not events:
            await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller  # the caller sees its own cancellation...
    release.set()
    await asyncio.wait_for(settler.wait(), 5)  # ...and the work still ends

    assert events == ["committed", "followed up", "done"]


async def test_a_failing_work_raises_to_its_caller_and_still_calls_done() -> None:
    settler, done = Settler(), asyncio.Event()

    async def fails() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await settler.settle(fails(), done.set)

    assert done.is_set()
    await asyncio.wait_for(settler.wait(), 5)


async def test_wait_returns_at_once_with_nothing_settling() -> None:
    await asyncio.wait_for(Settler().wait(), 1)

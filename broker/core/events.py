"""In-process notifications of task state changes, for watchers and result waiters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from gpubroker.broker.model import Task

__all__ = ["Subscription", "TaskEvents", "TaskSink"]


class TaskSink(Protocol):
    """Where snapshots are delivered: an ``asyncio.Queue`` that takes tasks."""

    def put_nowait(self, task: Task, /) -> None:
        """Takes a snapshot without blocking."""


class TaskEvents:
    """Fans each task snapshot out to the queues subscribed to that task."""

    def __init__(self, listeners: Iterable[Callable[[Task], None]] = ()) -> None:
        self._subscribers: dict[str, set[TaskSink]] = {}
        self._listeners = list(listeners)

    def add_listener(self, listener: Callable[[Task], None]) -> None:
        """Calls ``listener`` with every snapshot published from now on (it must not block)."""
        self._listeners.append(listener)

    def publish(self, task: Task) -> None:
        """Delivers a snapshot to the listeners and to every subscriber of the task."""
        for listener in self._listeners:
            listener(task)
        for queue in self._subscribers.get(task.id, ()):
            queue.put_nowait(task)

    def subscription(self, sink: TaskSink) -> Subscription:
        """Delivers the snapshots of many tasks, added as they become known, to ``sink``,
        until the subscription is closed."""
        return Subscription(self._subscribers, sink)

    @contextlib.contextmanager
    def subscribe(self, task_id: str) -> Iterator[asyncio.Queue[Task]]:
        """Receives the task's snapshots while the block runs."""
        queue: asyncio.Queue[Task] = asyncio.Queue()
        subscribers = self._subscribers.setdefault(task_id, set())
        subscribers.add(queue)
        try:
            yield queue
        finally:
            subscribers.discard(queue)
            if not subscribers:
                self._subscribers.pop(task_id, None)


class Subscription:
    """Delivers the snapshots of every task ``add``-ed to it to one sink."""

    def __init__(self, subscribers: dict[str, set[TaskSink]], sink: TaskSink) -> None:
        self._subscribers = subscribers
        self._task_ids: set[str] = set()
        self._sink = sink

    def add(self, task_id: str) -> None:
        """Starts delivering ``task_id``'s snapshots."""
        self._task_ids.add(task_id)
        self._subscribers.setdefault(task_id, set()).add(self._sink)

    def discard(self, task_id: str) -> None:
        """Stops delivering ``task_id``'s snapshots."""
        self._task_ids.discard(task_id)
        subscribers = self._subscribers.get(task_id)
        if subscribers is not None:
            subscribers.discard(self._sink)
            if not subscribers:
                del self._subscribers[task_id]

    def close(self) -> None:
        """Stops delivering anything."""
        for task_id in list(self._task_ids):
            self.discard(task_id)

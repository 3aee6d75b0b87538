"""In-process notifications of task state changes, for watchers and result waiters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator

from broker.model import Task

__all__ = ["TaskEvents"]


class TaskEvents:
    """Fans each task snapshot out to the queues subscribed to that task."""

    def __init__(self, listeners: Iterable[Callable[[Task], None]] = ()) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[Task]]] = {}
        self._listeners = tuple(listeners)

    def publish(self, task: Task) -> None:
        """Delivers a snapshot to the listeners and to every subscriber of the task."""
        for listener in self._listeners:
            listener(task)
        for queue in self._subscribers.get(task.id, ()):
            queue.put_nowait(task)

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

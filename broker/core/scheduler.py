"""Which queued task runs next: fair share across tenants, then priority and age within one.

Pure data structure, no I/O. A tenant's own ``priority`` orders only that tenant's tasks, so a
tenant cannot jump ahead of others by raising its priorities; across tenants, the one with the
fewest running tasks goes next, ties going to the one served least recently.

Tasks are kept in one queue per placement class (any hashable key; the dispatcher uses
``placement.PlacementKey``: workload and GPU requirement), and every class shares the tenants'
running counts and turns. ``pop`` takes only from the classes its caller accepts, so a class
no agent can serve costs one check per pop however many tasks it holds, and blocks nobody.

It also counts each tenant's queued tasks in O(1) (per tenant, not per task), so the per-tenant
queue quota costs a dictionary lookup on the submit path.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["FairQueue", "Head", "Waiting"]

_Entry = tuple[int, int, str]
"""``(-priority, seq, task_id)``: a heap orders a tenant's tasks by priority, then age."""


@dataclass(frozen=True, slots=True)
class Head:
    """The task a class would give next: what ``pop``'s ``accept`` is asked about."""

    key: Hashable
    """The placement class."""
    task_id: str
    tenant: str
    queued_at: float
    """When the task was (re)queued, on the caller's clock."""


@dataclass(frozen=True, slots=True)
class Waiting:
    """The queued tasks of one tenant in one placement class (``FairQueue.waiting``)."""

    key: Hashable
    tenant: str
    depth: int
    oldest_queued_at: float
    """When the longest-waiting of them was (re)queued, on the caller's clock."""


@dataclass(eq=False)
class _Class:
    """One placement class: per-tenant heaps of its tasks."""

    heaps: dict[str, list[_Entry]] = field(default_factory=dict)
    size: int = 0
    """Live (not removed) tasks in the class."""


class FairQueue:
    """Queued task ids, per placement class and tenant, in heaps of ``(-priority, seq, id)``."""

    def __init__(self) -> None:
        self._classes: dict[Hashable, _Class] = {}
        self._where: dict[str, tuple[str, Hashable, float]] = {}
        """task id -> (tenant, class key, queued_at) of every live queued task."""
        self._running: Counter[str] = Counter()
        self._queued: Counter[str] = Counter()
        self._last_served: dict[str, int] = {}
        self._clock = itertools.count()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._where

    def push(
        self,
        task_id: str,
        tenant: str,
        priority: int,
        seq: int,
        *,
        key: Hashable = None,
        queued_at: float = 0.0,
    ) -> None:
        """Queues a task in class ``key``; pushing a queued task again does nothing."""
        if task_id in self._where:
            return
        self._where[task_id] = (tenant, key, queued_at)
        self._queued[tenant] += 1
        queue = self._classes.setdefault(key, _Class())
        queue.size += 1
        heapq.heappush(queue.heaps.setdefault(tenant, []), (-priority, seq, task_id))

    def remove(self, task_id: str) -> bool:
        """Drops a queued task (lazily: its heap entry is skipped later)."""
        found = self._where.pop(task_id, None)
        if found is None:
            return False
        tenant, key, _ = found
        self._unqueue(tenant, key)
        return True

    def pop(self, accept: Callable[[Head], bool] | None = None) -> tuple[str, str] | None:
        """Takes the next task as ``(task_id, tenant)``, or None when nothing is queued.

        With ``accept``, only classes whose next task it accepts are considered: the fairest
        of those goes (tenant turn first, then priority and age).
        """
        best: tuple[tuple[int, int, int, int], Head] | None = None
        for key in list(self._classes):
            head = self._head(key)
            if head is None or (accept is not None and not accept(head)):
                continue
            entry = self._classes[key].heaps[head.tenant][0]
            rank = (*self._tenant_rank(head.tenant), entry[0], entry[1])
            if best is None or rank < best[0]:
                best = (rank, head)
        if best is None:
            return None
        return self._take(best[1])

    def classes(self) -> Iterator[tuple[Hashable, int]]:
        """Every class with queued tasks, and how many it holds."""
        for key, queue in self._classes.items():
            if queue.size:
                yield key, queue.size

    def ids(self) -> list[str]:
        """Every queued task's id (for reconciliation with the database)."""
        return list(self._where)

    def where(self, task_id: str) -> tuple[Hashable, float] | None:
        """A queued task's class and the time it was queued; None when it is not queued."""
        found = self._where.get(task_id)
        return None if found is None else (found[1], found[2])

    def waiting(self) -> list[Waiting]:
        """How many tasks each tenant has queued in each class, and since when (O(tasks))."""
        found: dict[tuple[Hashable, str], list[float]] = {}
        for tenant, key, queued_at in self._where.values():
            entry = found.setdefault((key, tenant), [0, queued_at])
            entry[0] += 1
            entry[1] = min(entry[1], queued_at)
        return [Waiting(key, tenant, int(n), t) for (key, tenant), (n, t) in found.items()]

    def position(self, task_id: str) -> int | None:
        """A queued task's place in its class, 1 for the next to go; None when not queued."""
        return self.positions((task_id,)).get(task_id)

    def positions(self, task_ids: Iterable[str]) -> dict[str, int]:
        """The places of those of ``task_ids`` that are queued, each in its class (1: next).

        It plays each class's pops forward from now, each taken task counting as running for
        its tenant, as the dispatcher's would; pops of other classes, new submits and tasks
        finishing will move them. One pass per class, O(k log k) for the k tasks up to the
        last one asked about.
        """
        wanted: dict[Hashable, set[str]] = {}
        for task_id in task_ids:
            if (found := self._where.get(task_id)) is not None:
                wanted.setdefault(found[1], set()).add(task_id)
        places: dict[str, int] = {}
        for key, ids in wanted.items():
            places |= self._play(key, ids)
        return places

    def _play(self, key: Hashable, wanted: set[str]) -> dict[str, int]:
        heaps = {
            tenant: [e for e in heap if (w := self._where.get(e[2])) is not None and w[1] == key]
            for tenant, heap in self._classes[key].heaps.items()
        }
        heaps = {tenant: heap for tenant, heap in heaps.items() if heap}
        for heap in heaps.values():
            heapq.heapify(heap)
        running = {tenant: self._running[tenant] for tenant in heaps}
        served = {tenant: self._last_served.get(tenant, -1) for tenant in heaps}
        turn = max(served.values(), default=-1) + 1  # later than every real turn
        places: dict[str, int] = {}
        position = 0
        while heaps and len(places) < len(wanted):
            tenant = min(heaps, key=lambda t: (running[t], served[t]))
            position += 1
            task_id = heapq.heappop(heaps[tenant])[2]
            if task_id in wanted:
                places[task_id] = position
            if not heaps[tenant]:
                del heaps[tenant]
            running[tenant] += 1
            served[tenant] = turn
            turn += 1
        return places

    def started(self, tenant: str) -> None:
        """Counts a task of ``tenant`` as running (it weighs on the tenant's share)."""
        self._running[tenant] += 1

    def finished(self, tenant: str) -> None:
        """Counts a running task of ``tenant`` as done."""
        self._running[tenant] -= 1
        if self._running[tenant] <= 0:
            del self._running[tenant]

    def queued(self, tenant: str) -> int:
        """How many of the tenant's tasks wait in the queue."""
        return self._queued[tenant]

    def running(self, tenant: str) -> int:
        """How many of the tenant's tasks run now."""
        return self._running[tenant]

    def _head(self, key: Hashable) -> Head | None:
        """The class's next task: its fairest tenant's first live entry (stale ones dropped)."""
        queue = self._classes[key]
        while queue.heaps:
            tenant = min(queue.heaps, key=self._tenant_rank)
            heap = queue.heaps[tenant]
            task_id = heap[0][2]
            found = self._where.get(task_id)
            if found is not None and found[1] == key:
                return Head(key, task_id, tenant, found[2])
            heapq.heappop(heap)  # removed, or requeued into another class
            if not heap:
                del queue.heaps[tenant]
        if not queue.size:
            del self._classes[key]
        return None

    def _take(self, head: Head) -> tuple[str, str]:
        queue = self._classes[head.key]
        heap = queue.heaps[head.tenant]
        heapq.heappop(heap)
        if not heap:
            del queue.heaps[head.tenant]
        del self._where[head.task_id]
        self._unqueue(head.tenant, head.key)
        self._last_served[head.tenant] = next(self._clock)
        return head.task_id, head.tenant

    def _unqueue(self, tenant: str, key: Hashable) -> None:
        self._queued[tenant] -= 1
        if not self._queued[tenant]:
            del self._queued[tenant]
        queue = self._classes[key]
        queue.size -= 1
        if not queue.size and not queue.heaps:
            del self._classes[key]

    def _tenant_rank(self, tenant: str) -> tuple[int, int]:
        return self._running[tenant], self._last_served.get(tenant, -1)

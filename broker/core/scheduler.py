"""Which queued task runs next: fair share across tenants, then priority and age within one.

Pure data structure, no I/O. A tenant's own ``priority`` orders only that tenant's tasks, so a
tenant cannot jump ahead of others by raising its priorities; across tenants, the one with the
fewest running tasks goes next, ties going to the one served least recently.

It also counts each tenant's queued tasks in O(1) (per tenant, not per task), so the per-tenant
queue quota costs a dictionary lookup on the submit path.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter

__all__ = ["FairQueue"]


class FairQueue:
    """Queued task ids, per tenant, in a heap of ``(-priority, seq, task_id)``."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[tuple[int, int, str]]] = {}
        self._tenant_of: dict[str, str] = {}
        self._running: Counter[str] = Counter()
        self._queued: Counter[str] = Counter()
        self._last_served: dict[str, int] = {}
        self._clock = itertools.count()

    def __len__(self) -> int:
        return len(self._tenant_of)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tenant_of

    def push(self, task_id: str, tenant: str, priority: int, seq: int) -> None:
        """Queues a task; pushing a queued task again does nothing."""
        if task_id in self._tenant_of:
            return
        self._tenant_of[task_id] = tenant
        self._queued[tenant] += 1
        heapq.heappush(self._heaps.setdefault(tenant, []), (-priority, seq, task_id))

    def remove(self, task_id: str) -> bool:
        """Drops a queued task (lazily: its heap entry is skipped later)."""
        tenant = self._tenant_of.pop(task_id, None)
        if tenant is None:
            return False
        self._unqueue(tenant)
        return True

    def pop(self) -> tuple[str, str] | None:
        """Takes the next task as ``(task_id, tenant)``, or None when nothing is queued."""
        while self._heaps:
            tenant = min(self._heaps, key=self._tenant_rank)
            heap = self._heaps[tenant]
            _, _, task_id = heapq.heappop(heap)
            if not heap:
                del self._heaps[tenant]
            if self._tenant_of.pop(task_id, None) is not None:
                self._unqueue(tenant)
                self._last_served[tenant] = next(self._clock)
                return task_id, tenant
        return None

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

    def _unqueue(self, tenant: str) -> None:
        self._queued[tenant] -= 1
        if not self._queued[tenant]:
            del self._queued[tenant]

    def _tenant_rank(self, tenant: str) -> tuple[int, int]:
        return self._running[tenant], self._last_served.get(tenant, -1)

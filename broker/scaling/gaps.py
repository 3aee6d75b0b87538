"""How long to keep an idle machine: the ski-rental rule, fitted to the gaps this broker sees.

Pure logic for the autoscaling policy: no grpc, no I/O; times come from the caller's clock.
An idle machine kept through a gap of ``g`` seconds costs ``g`` (billed, idle); stopped after
``t`` seconds it costs ``t`` plus a boot when work comes back (billed before its agent can
serve). Keeping for one boot time is the deterministic ski-rental answer, never more than
twice the best in hindsight, whatever the gaps. But gaps are not adversarial: bursts an hour
apart never end within a boot, a trickle every minute always does. So ``GapLearner`` records
the real gaps (from a machine going idle to the work that needed it, or would have) and picks
the keep time that would have cost least over the recent ones; with too few observed it uses
one boot time.

A gap ends for a kept machine when it runs a task again. For a stopped one it ends when work
next needs a machine: queued tasks beyond the free slots, one stopped machine per
``slots_per_instance`` such tasks, the most recently idle first.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["GapLearner", "best_keep_s"]

GAP_HISTORY = 64
"""Gaps remembered; older ones age out, so the rule follows a changing workload."""


def best_keep_s(gaps: Iterable[float], boot_s: float) -> float:
    """The keep time that would have cost least over ``gaps`` (ties: the shorter).

    The cost of a keep time only grows between two observed gaps, so the best is 0 or one of
    them; a gap over two boots never is (stopping at once costs one boot, less than it).
    """
    observed = list(gaps)
    candidates = [0.0, *sorted(g for g in observed if g <= 2 * boot_s)]
    best, best_cost = 0.0, math.inf
    for keep in candidates:
        cost = sum(g if g <= keep else keep + boot_s for g in observed)
        if cost < best_cost - 1e-9:
            best, best_cost = keep, cost
    return best


@dataclass(slots=True)
class _Stopped:
    idle_since_s: float
    stopped_s: float


class GapLearner:
    """Records idle gaps from snapshots and says how long an idle machine is worth keeping."""

    def __init__(self, min_samples: int) -> None:
        """``min_samples``: gaps needed before the fitted rule replaces the fallback."""
        self.min_samples = min_samples
        self.gaps: deque[float] = deque(maxlen=GAP_HISTORY)
        self._idle: dict[str, float] = {}
        self._stopped: list[_Stopped] = []

    def keep_s(self, boot_s: float, fallback_s: float) -> float:
        """How long to keep an idle machine: fitted to the gaps, or ``fallback_s`` until enough."""
        if len(self.gaps) < self.min_samples:
            return fallback_s
        return best_keep_s(self.gaps, boot_s)

    def observe(
        self,
        idle: dict[str, float],
        busy: Iterable[str],
        machines_wanted: int,
        now_s: float,
        horizon_s: float,
    ) -> None:
        """One snapshot: ``idle`` maps idle machines to when they went idle, ``busy`` names
        those running tasks, ``machines_wanted`` is how many more machines queued work needs
        beyond the free slots (0 when none). A stopped machine's gap still open after
        ``horizon_s`` is recorded as that long (longer ones weigh the same in ``best_keep_s``)."""
        for name in busy:
            since = self._idle.pop(name, None)
            if since is not None:
                self.gaps.append(now_s - since)
        for name in [n for n in self._idle if n not in idle]:
            del self._idle[name]  # gone without running anything: stopped() saw it, or lost
        self._idle.update(idle)
        self._stopped.sort(key=lambda s: s.idle_since_s)
        for _ in range(min(machines_wanted, len(self._stopped))):
            self.gaps.append(now_s - self._stopped.pop().idle_since_s)
        while self._stopped and now_s - self._stopped[0].idle_since_s > horizon_s:
            self.gaps.append(horizon_s)
            self._stopped.pop(0)

    def stopped(self, name: str, now_s: float) -> None:
        """The policy stopped idle machine ``name``: its gap stays open until work comes."""
        since = self._idle.pop(name, None)
        if since is not None:
            self._stopped.append(_Stopped(since, now_s))

"""The policy's knobs against each baseline: which setting, if any, beats it on each trace.

Waiting longer lets fewer machines do the same work (fewer boots, less idle), so billed / VM
cost rises with the wait; a policy "beats" a baseline on a trace when one of its settings costs
at most the baseline's money for at most its p95 wait. The knobs are the ones an operator sets
in ``deploy/scaling-gce.toml``: ``max_queue_delay_s`` (collect work before starting machines),
``launch_work_boots`` (how much queued work a new machine must get) and ``min_idle_s`` (keep
idle machines warm at least this long). For every trace this runs our policy at each setting
of ``GRID`` and reports, per baseline, the setting with the best billed / VM cost whose
p95 wait is no worse than the baseline's, or that none is. Waits are compared to within one
decision interval (``SLACK_S``, the scaling loop's tick): no policy acts in less, so a wait a
fraction of a tick longer is the same wait. Within that slack and ``TIE`` of the ratio the two
are tied. A baseline no setting beats sits on
the frontier itself: e.g. autostop 5 min on a trickle, which waits 0 s with a warm machine at a
ratio a zero-wait oracle cannot beat either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from rich.table import Table

from gpubroker.broker.scaling.policy import ScalingPolicy

__all__ = [
    "BASELINES",
    "GRID",
    "SLACK_S",
    "TIE",
    "Beat",
    "Point",
    "Setting",
    "best_within",
    "frontier_table",
]


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting of the knobs."""

    max_queue_delay_s: float
    launch_work_boots: float
    min_idle_s: float

    @property
    def name(self) -> str:
        """A short label: ``delay 150 s, boots 2, warm 0 s``."""
        return (
            f"delay {self.max_queue_delay_s:g} s, boots {self.launch_work_boots:g}, "
            f"warm {self.min_idle_s:g} s"
        )

    def apply(self, policy: ScalingPolicy) -> ScalingPolicy:
        """``policy`` with these knobs."""
        return replace(
            policy,
            max_queue_delay_s=self.max_queue_delay_s,
            launch_work_boots=self.launch_work_boots,
            min_idle_s=self.min_idle_s,
        )


GRID = tuple(
    Setting(delay, boots, warm)
    for delay in (0.0, 150.0, 300.0, 600.0)
    for boots in (2.0, 1.0, 0.0)
    for warm in (0.0, 300.0)
)
"""The settings tried, the deployed one (delay 0 s, 2 boots, warm 0 s) first. ``0 boots``
sizes launches by slots alone, as the autostop baselines do."""
BASELINES = ("autostop-0s", "autostop-5min")
"""The policies each trace's settings are held against."""
SLACK_S = 5.0
"""Waits this close count as equal: the decision interval of ``deploy/scaling-gce.toml``."""
TIE = 0.001
"""Billed / VM cost ratios this close (0.1 point) count as equal."""


@dataclass(frozen=True, slots=True)
class Point:
    """One policy's result on one trace."""

    billed_over_vm: float
    wait_p95_s: float


@dataclass(frozen=True, slots=True)
class Beat:
    """The best of our settings against one baseline on one trace."""

    baseline: str
    target: Point
    setting: str | None
    """The row name of the best setting within the baseline's wait; None: none is."""
    reached: Point | None

    @property
    def beats(self) -> bool:
        """Whether that setting costs no more for the same wait (or less)."""
        return (
            self.reached is not None and self.reached.billed_over_vm >= self.target.billed_over_vm
        )

    @property
    def verdict(self) -> str:
        """``beaten``, ``tied`` (the same ratio and wait, within ``TIE`` and ``SLACK_S``) or
        ``not beaten``."""
        reached, target = self.reached, self.target
        if reached is None:
            return "not beaten"
        close = abs(reached.billed_over_vm - target.billed_over_vm) < TIE
        if close and abs(reached.wait_p95_s - target.wait_p95_s) <= SLACK_S:
            return "tied"
        return "beaten" if self.beats else "not beaten"


def best_within(
    baseline: str, target: Point, ours: Mapping[str, Point], slack_s: float = SLACK_S
) -> Beat:
    """Of ``ours`` (row name to result, in order of preference), the best billed / VM cost at
    no more than ``target``'s p95 wait plus ``slack_s``; of settings within ``TIE`` of the
    best, the first."""
    limit = target.wait_p95_s + slack_s
    fitting = [(name, p) for name, p in ours.items() if p.wait_p95_s <= limit]
    if not fitting:
        return Beat(baseline, target, None, None)
    best = max(p.billed_over_vm for _, p in fitting)
    name, point = next((n, p) for n, p in fitting if p.billed_over_vm > best - TIE)
    return Beat(baseline, target, name, point)


def frontier_table(beats: Mapping[str, Sequence[Beat]]) -> Table:
    """One row per trace and baseline."""
    table = Table(
        title=f"the knobs against each baseline: the best setting within its p95 wait "
        f"(+{SLACK_S:g} s, one decision interval)"
    )
    for column in ("trace", "baseline", "baseline's ratio @ p95", "best of ours within it", ""):
        table.add_column(column)
    for trace, rows in beats.items():
        for beat in rows:
            target = f"{beat.target.billed_over_vm:.1%} @ {beat.target.wait_p95_s:.0f} s"
            if beat.reached is None or beat.setting is None:
                best, verdict = "no setting waits that little", "not beaten"
            else:
                best = (
                    f"{beat.reached.billed_over_vm:.1%} @ {beat.reached.wait_p95_s:.0f} s "
                    f"({beat.setting})"
                )
                verdict = beat.verdict
            table.add_row(trace, beat.baseline, target, best, verdict)
    return table

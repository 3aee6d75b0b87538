"""What earlier runs of the broker recorded that the policy learns from: boots and run times.

The scaling loop reads these once when it starts (``ScalingLoop.learn_history``), so a broker
restart does not reset its estimates to the configured defaults.
"""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa

from gpubroker.billing.models import usage, vm_instances

__all__ = ["BOOTS_PER_TYPE", "RECENT_RUNS", "recorded_boots", "recorded_runs"]

BOOTS_PER_TYPE = 20
"""Recorded boots read per GPU type: enough for the smoothed estimate to forget its default."""
RECENT_RUNS = 50
"""Recorded task run times read."""


def recorded_boots(
    engine: sa.Engine, provider: str, longest_s: float, per_type: int = BOOTS_PER_TYPE
) -> list[tuple[str, float]]:
    """The last ``per_type`` boots per GPU type of ``provider``'s machines, oldest first, as
    ``(gpu_type, seconds from creation to the agent's first connection)``.

    A "boot" over ``longest_s`` (the policy's boot timeout) is left out: such a machine would
    have been deleted as stuck, so its connection was seen late, e.g. by a broker that
    started after it, and says nothing about how long machines take to boot.
    """
    query = (
        sa.select(vm_instances.c.gpu_type, vm_instances.c.created_at, vm_instances.c.connected_at)
        .where(vm_instances.c.provider == provider, vm_instances.c.connected_at.is_not(None))
        .order_by(vm_instances.c.created_at.desc(), vm_instances.c.name.desc())
        .limit(per_type * 16)  # a bound on the rows read, however many types there are
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    kept: dict[str, int] = defaultdict(int)
    boots: list[tuple[str, float]] = []
    for gpu_type, created_at, connected_at in rows:
        seconds = (connected_at - created_at).total_seconds()
        if 0 <= seconds <= longest_s and kept[gpu_type] < per_type:
            kept[gpu_type] += 1
            boots.append((gpu_type, seconds))
    boots.reverse()
    return boots


def recorded_runs(engine: sa.Engine, limit: int = RECENT_RUNS) -> list[float]:
    """The billed compute of the last ``limit`` succeeded tasks, oldest first."""
    query = sa.select(usage.c.compute_seconds).order_by(usage.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        runs = [float(seconds) for (seconds,) in conn.execute(query)]
    runs.reverse()
    return runs

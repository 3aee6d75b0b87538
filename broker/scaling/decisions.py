"""What the autoscaling policy looks at and what it decides: plain values, no logic.

``Snapshot`` (the queue and every instance, built by the scaling loop or the cost simulator)
goes into ``policy.Autoscaler.decide``; a ``Decision`` (``Launch``es and ``Termination``s)
comes out, for the loop to carry out through a provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpubroker.broker.scaling.demand import Demand
from gpubroker.broker.scaling.providers.base import InstanceStatus, LaunchRequest

__all__ = ["Decision", "InstanceSnapshot", "Launch", "Snapshot", "Termination"]


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    """One instance as the autoscaler sees it: provider status plus what its agent is doing."""

    name: str
    status: InstanceStatus
    gpu_type: str
    spot: bool
    price_per_hour_nanousd: int
    """Its hourly price, from the price catalog."""
    created_at_s: float
    """When the provider created it, on the caller's clock."""
    running_since_s: float | None = None
    """When it reached RUNNING (billing starts); None falls back to ``created_at_s``."""
    connected: bool = False
    """Its agent holds a control stream to the broker now."""
    running_tasks: int = 0
    """Attempts its agent runs now."""
    idle_since_s: float | None = None
    """When it last finished a task or (re)connected; None if its agent never connected."""
    agent_last_seen_s: float | None = None
    """Last time its agent was connected; None if never. Ignored while connected."""

    @property
    def is_idle(self) -> bool:
        """Connected, running, and running nothing."""
        return (
            self.status is InstanceStatus.RUNNING
            and self.connected
            and self.running_tasks == 0
            and self.idle_since_s is not None
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one decision looks at."""

    queue_depth: int = 0
    """Tasks queued and not yet assigned."""
    oldest_queued_age_s: float = 0.0
    """How long the oldest queued task has waited; 0 when the queue is empty."""
    free_slots: int = 0
    """Unused slots across connected agents."""
    instances: Sequence[InstanceSnapshot] = ()
    """Every instance the provider knows of."""
    pending_launches: int = 0
    """Launches ordered whose instance is not in ``instances`` yet."""
    demands: Sequence[Demand] | None = None
    """Queued tasks per GPU requirement; None: count ``queue_depth`` against ``free_slots``."""
    pending_types: Sequence[str] = ()
    """The first GPU type of each pending launch."""
    held_types: frozenset[str] = frozenset()
    """GPU types whose launches are held after failures (``backoff``): a launch goes to the
    request's first type not held, so it is sized with that type's boots."""


@dataclass(frozen=True, slots=True)
class Launch:
    """Start ``count`` instances of ``request``; ``count`` is 0 when limits refused them."""

    count: int
    request: LaunchRequest
    reason: str
    kind: str = "demand"
    """Why, for code: ``demand`` (queued work) or ``min_instances``."""


@dataclass(frozen=True, slots=True)
class Termination:
    """Delete the instance ``name``."""

    name: str
    reason: str
    """Why, for people."""
    kind: str = "idle"
    """Why, for code: ``idle``, ``stuck`` (its agent never or no longer connects) or
    ``terminated`` (the provider already reports it gone, e.g. preempted)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now: a ``Launch`` per launch request wanted, and any ``Termination``s."""

    launches: tuple[Launch, ...] = ()
    """Empty when no scale-up was wanted."""
    terminations: tuple[Termination, ...] = ()

    @property
    def launch(self) -> Launch | None:
        """The first launch; None when no scale-up was wanted."""
        return self.launches[0] if self.launches else None

    @property
    def terminated_names(self) -> tuple[str, ...]:
        """Names of the instances to delete."""
        return tuple(t.name for t in self.terminations)

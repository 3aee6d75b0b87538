"""Which GPU types queued work needs started: demand per requirement against capacity.

Pure arithmetic for the autoscaling policy: no grpc, no I/O, no clock. The loop sums the queue
per GPU requirement (``Demand``: queued tasks and the free slots of connected agents that may
run them); ``plan`` takes what booting machines of fitting types will serve, and asks for the
rest on the cheapest configured types that fit. An unconstrained requirement asks for the
configured ``launch_request`` as it is (the operator's order of preference).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpubroker.billing.prices import GPU_MEMORY_BYTES
from gpubroker.broker.model import GpuRequirement
from gpubroker.broker.scaling.providers.base import LaunchRequest

__all__ = ["Demand", "GpuChoice", "Want", "choices_of", "plan", "request_for"]


@dataclass(frozen=True, slots=True)
class GpuChoice:
    """A GPU type the autoscaler may start, with what placing and pricing it needs."""

    gpu_type: str
    memory_bytes: int = 0
    """Device memory (``billing.prices.GPU_MEMORY_BYTES``); 0 when unknown."""
    price_per_hour_nanousd: int = 0
    """Hourly price at the configured Spot choice: what "cheapest" compares."""
    worst_price_nanousd: int = 0
    """On-demand hourly price (providers may fall back to it), for the spend cap."""


@dataclass(frozen=True, slots=True)
class Demand:
    """Queued tasks that share a GPU requirement."""

    requires: GpuRequirement
    queued: int
    """Tasks queued with this requirement."""
    free_slots: int = 0
    """Free slots of connected agents that may run them (at most ``queued``)."""


@dataclass(frozen=True, slots=True)
class Want:
    """Instances wanted of one launch request, and why."""

    request: LaunchRequest
    count: int
    reasons: tuple[str, ...]
    queued: int = 0
    """Tasks queued for the demands behind it (what the new machines would share)."""


def choices_of(request: LaunchRequest) -> tuple[GpuChoice, ...]:
    """Unpriced choices for the request's types, memory from the table (order kept)."""
    return tuple(GpuChoice(g, GPU_MEMORY_BYTES.get(g, 0)) for g in request.gpu_types)


def request_for(
    requires: GpuRequirement, choices: Sequence[GpuChoice], default: LaunchRequest
) -> LaunchRequest | None:
    """What to launch for tasks that need ``requires``: the fitting types, cheapest first
    (the provider falls back along them); None when no configured type fits."""
    if not requires:
        return default
    fitting = [c for c in choices if requires.fits(c.gpu_type, c.memory_bytes)]
    if not fitting:
        return None
    fitting.sort(key=lambda c: c.price_per_hour_nanousd)  # stable: ties keep configured order
    return dataclasses.replace(default, gpu_types=tuple(c.gpu_type for c in fitting))


def plan(
    demands: Sequence[Demand],
    choices: Sequence[GpuChoice],
    booting: Mapping[str, int],
    slots_per_instance: int,
    default: LaunchRequest,
) -> list[Want]:
    """The instances to start so every demand has a free, booting or new slot that fits.

    ``booting`` counts machines booting or being launched, by GPU type. The most constrained
    demands go first, so they take the booting slots only they can use; a new machine's spare
    slots serve the demands after it.
    """
    memory = {g: GPU_MEMORY_BYTES.get(g, 0) for g in booting} | {
        c.gpu_type: c.memory_bytes for c in choices
    }
    spare: Counter[str] = Counter({g: n * slots_per_instance for g, n in booting.items()})
    wants: dict[tuple[object, ...], Want] = {}
    for demand in sorted(demands, key=lambda d: _fitting(d.requires, choices)):
        need = demand.queued - demand.free_slots
        for gpu_type in sorted(spare):
            if need > 0 and demand.requires.fits(gpu_type, memory.get(gpu_type, 0)):
                taken = min(need, spare[gpu_type])
                need -= taken
                spare[gpu_type] -= taken
        request = request_for(demand.requires, choices, default)
        if need <= 0 or request is None:
            continue
        count = math.ceil(need / slots_per_instance)
        spare[request.gpu_types[0]] += count * slots_per_instance - need
        what = f" needing {demand.requires}" if demand.requires else ""
        reason = f"{demand.queued} queued tasks{what} exceed the {demand.queued - need} slots"
        reason += " free or booting for them"
        key = (tuple(request.gpu_types), request.spot, request.max_run_seconds)
        known = wants.get(key)
        queued = demand.queued
        if known is not None:
            count, reasons = known.count + count, (*known.reasons, reason)
            queued += known.queued
        else:
            reasons = (reason,)
        wants[key] = Want(request, count, reasons, queued)
    return list(wants.values())


def _fitting(requires: GpuRequirement, choices: Sequence[GpuChoice]) -> tuple[bool, int]:
    """Sort key: constrained requirements first, those fewer types fit before the others."""
    return (not requires, sum(requires.fits(c.gpu_type, c.memory_bytes) for c in choices))

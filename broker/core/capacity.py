"""Which GPUs the broker can get: the autoscaler's configured types, and agents' own.

A task that requires a GPU none of these provides would wait forever, so the task service
refuses it at submit (``NoMatchingGpuError``, FAILED_PRECONDITION) naming what is available.
The autoscaling loop also tells this object which types are booting, so a queued task's
status can say it waits for one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from gpubroker.broker.errors import NoMatchingGpuError
from gpubroker.broker.model import AgentInfo, GpuRequirement

__all__ = ["Capacity", "GpuOffer"]


@dataclass(frozen=True, slots=True)
class GpuOffer:
    """One GPU type the broker can get, with its device memory."""

    gpu_type: str
    memory_bytes: int | None = None
    """Device memory; None when unknown (then it meets no memory requirement)."""

    def fits(self, requires: GpuRequirement) -> bool:
        """True when a device of this offer satisfies ``requires``."""
        return requires.fits(self.gpu_type, self.memory_bytes or 0)

    def __str__(self) -> str:
        if not self.memory_bytes:
            return self.gpu_type
        return f"{self.gpu_type} ({self.memory_bytes / 2**30:.3g} GiB)"


class Capacity:
    """The GPU types configured for the autoscaler, those agents have brought, and those
    booting now."""

    def __init__(self, configured: Iterable[GpuOffer] = ()) -> None:
        self._configured = tuple(configured)
        self._seen: dict[str, GpuOffer] = {}
        self._booting: Counter[str] = Counter()

    def configure(self, offers: Iterable[GpuOffer]) -> None:
        """Sets the types the autoscaler may start (the scaling loop, once configured)."""
        self._configured = tuple(offers)

    @property
    def configured(self) -> tuple[GpuOffer, ...]:
        """The types the autoscaler may start."""
        return self._configured

    def offers(self) -> list[GpuOffer]:
        """Every offer known: configured ones, then each agent type seen (largest memory)."""
        return [*self._configured, *self._seen.values()]

    def saw(self, info: AgentInfo) -> None:
        """Remembers a connected agent's GPU type and memory for the broker's life."""
        known = self._seen.get(info.gpu_type)
        if known is None or (known.memory_bytes or 0) < info.gpu_memory_bytes:
            self._seen[info.gpu_type] = GpuOffer(info.gpu_type, info.gpu_memory_bytes)

    def check(self, requires: GpuRequirement) -> None:
        """Refuses a requirement no known offer fits; with nothing known yet, accepts it.

        Raises:
            NoMatchingGpuError: offers are known and none fits.
        """
        offers = self.offers()
        if not requires or not offers or any(o.fits(requires) for o in offers):
            return
        available = ", ".join(sorted({str(o) for o in offers}))
        raise NoMatchingGpuError(f"no GPU type matches {requires}; available: {available}")

    def set_booting(self, gpu_types: Iterable[str]) -> None:
        """The types of the machines booting or being launched now (the scaling loop's view)."""
        self._booting = Counter(gpu_types)

    def booting_for(self, requires: GpuRequirement) -> str | None:
        """A booting type that fits ``requires``, if any."""
        memory = {o.gpu_type: o.memory_bytes or 0 for o in self.offers()}
        for gpu_type in sorted(self._booting):
            if requires.fits(gpu_type, memory.get(gpu_type, 0)):
                return gpu_type
        return None

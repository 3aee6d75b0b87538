"""What the scaling loop reports as it goes, for metrics (``broker.metrics.Metrics``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gpubroker.broker.scaling.fleet import FleetTick

__all__ = ["NoEvents", "ScalingEvents"]


class ScalingEvents(Protocol):
    """What the loop reports as it goes (``broker.metrics.Metrics`` is one)."""

    def boot_phase(self, phase: str, gpu_type: str, seconds: float) -> None:
        """One phase of one launched machine's boot (``boots.BootPhase``), once it connected."""

    def launch_failure(self, kind: str, gpu_type: str, zone: str) -> None:
        """A launch failed: ``stuck`` (its agent never connected) or ``no_capacity``."""

    def launch_holds(self, holds: Sequence[tuple[str, str, float]]) -> None:
        """Every held ``(gpu_type, zone, seconds left)`` now (zone ``*``: all zones)."""

    def decision(self, action: str, kind: str, gpu_type: str, count: int) -> None:
        """The policy decided to ``launch`` or ``stop`` ``count`` machines, and why in a word
        (``Launch.kind``, ``Termination.kind``)."""

    def fleet(self, tick: FleetTick) -> None:
        """The machines' states now and their time and cost since the last tick."""


class NoEvents:
    """Hears nothing: the loop's events when nobody listens."""

    def boot_phase(self, phase: str, gpu_type: str, seconds: float) -> None:
        pass

    def launch_failure(self, kind: str, gpu_type: str, zone: str) -> None:
        pass

    def launch_holds(self, holds: Sequence[tuple[str, str, float]]) -> None:
        pass

    def decision(self, action: str, kind: str, gpu_type: str, count: int) -> None:
        pass

    def fleet(self, tick: FleetTick) -> None:
        pass

"""Boot-time estimates per GPU type, learned from boots and seeded from the recorded ones.

A machine's boot (launch to its agent connected) depends on what it is: an H100 in a busy region
can take minutes longer to provision than an L4, and a type whose image pulls a large container
is slower still. The policy sizes a launch of a GPU type with that type's boots
(``for_types``); a type never seen yet uses the average over all types, and before any boot at
all the configured default.

Each estimate is an exponentially weighted average, starting from the configured default (one
early boot, fast or slow, does not swing it); a GPU type's starts from the overall one. A
broker restart would otherwise reset them all to the default and mis-size launches until new
boots come in, so the scaling loop seeds them, oldest first, from the boots ``billing.vms``
recorded (``history``). The zone is recorded there too, but the provider, not the policy,
picks the zone, so estimates stop at the GPU type (per-zone failures are ``backoff``'s).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["BootEstimates"]


class BootEstimates:
    """Smoothed boot times overall and per GPU type."""

    def __init__(self, default_s: float, smoothing: float) -> None:
        if default_s < 0:
            raise ValueError(f"a default boot cannot take {default_s} s")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self._default_s = default_s
        self._weight = smoothing
        self._overall: float | None = None
        self._by_type: dict[str, float] = {}

    def observe(self, seconds: float, gpu_type: str | None = None) -> None:
        """Folds one measured boot into the overall estimate and, if known, its type's."""
        if seconds < 0:
            raise ValueError(f"a boot cannot take {seconds} s")
        if gpu_type is not None:  # a type's first boot is weighed against what all taught
            base = self._by_type.get(gpu_type, self.overall_s)
            self._by_type[gpu_type] = self._folded(base, seconds)
        self._overall = self._folded(self.overall_s, seconds)

    def seed(self, boots: Iterable[tuple[str, float]]) -> int:
        """Folds recorded ``(gpu_type, seconds)`` boots, oldest first; returns how many."""
        count = 0
        for gpu_type, seconds in boots:
            self.observe(seconds, gpu_type)
            count += 1
        return count

    @property
    def overall_s(self) -> float:
        """The estimate over every type (the default before any boot)."""
        return self._default_s if self._overall is None else self._overall

    def for_types(self, gpu_types: Sequence[str]) -> float:
        """The boot a launch of ``gpu_types`` should expect: the first type's, which the
        provider tries first, or the overall estimate when that type has no boots yet."""
        if gpu_types and gpu_types[0] in self._by_type:
            return self._by_type[gpu_types[0]]
        return self.overall_s

    def known_types(self) -> dict[str, float]:
        """The per-type estimates learned so far."""
        return dict(self._by_type)

    def _folded(self, base: float, seconds: float) -> float:
        return self._weight * seconds + (1 - self._weight) * base

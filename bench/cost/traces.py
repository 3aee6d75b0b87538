"""Named, seeded workloads for the cost simulator: task arrivals and run times."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TRACES", "SimTask", "Trace", "make_trace"]


@dataclass(frozen=True, slots=True)
class SimTask:
    """One task: when it is submitted and how long it runs once started."""

    arrival_s: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class Trace:
    """A workload, tasks in arrival order; ``slow_boot`` asks for 240-360 s boots."""

    name: str
    tasks: tuple[SimTask, ...]
    slow_boot: bool = False


def _bursts(
    rng: random.Random, bursts: int, size: int, run_s: tuple[float, float]
) -> list[SimTask]:
    """``bursts`` bursts of ``size`` tasks (submitted over 10 s), gaps of 1-30 min between."""
    tasks: list[SimTask] = []
    start = 0.0
    for _ in range(bursts):
        tasks += [SimTask(start + rng.uniform(0.0, 10.0), rng.uniform(*run_s)) for _ in range(size)]
        start += 10.0 + rng.uniform(60.0, 1800.0)
    return tasks


def _bursty_day(rng: random.Random) -> list[SimTask]:
    return _bursts(rng, 20, 50, (5.0, 60.0))


def _small_bursts(rng: random.Random) -> list[SimTask]:
    return _bursts(rng, 20, 10, (5.0, 10.0))


def _trickle(rng: random.Random) -> list[SimTask]:
    return [SimTask(i * 90.0, 20.0) for i in range(4 * 3600 // 90)]


def _long_job(rng: random.Random) -> list[SimTask]:
    return [SimTask(0.0, 7200.0)]


def _mixture(rng: random.Random) -> list[SimTask]:
    """Ten bursts of the bursty day, the trickle beside them, and a 2-hour job after an hour."""
    return [*_bursts(rng, 10, 50, (5.0, 60.0)), *_trickle(rng), SimTask(3600.0, 7200.0)]


_MAKERS: dict[str, tuple[Callable[[random.Random], list[SimTask]], bool]] = {
    "bursty-day": (_bursty_day, False),
    "small-bursts": (_small_bursts, False),
    "trickle": (_trickle, False),
    "two-hour-job": (_long_job, False),
    "mixture": (_mixture, False),
    "bursty-day-slow-boot": (_bursty_day, True),
}

TRACES = tuple(_MAKERS)
"""Every trace name, in the order the report prints them."""


def make_trace(name: str, seed: int) -> Trace:
    """The trace ``name`` drawn with ``seed`` (the same seed gives the same tasks).

    Raises:
        ValueError: no trace has that name.
    """
    if name not in _MAKERS:
        raise ValueError(f"unknown trace {name!r}; known: {', '.join(TRACES)}")
    maker, slow = _MAKERS[name]
    # Keyed by the maker, so the slow-boot variant runs the very tasks of its fast twin.
    rng = random.Random(f"{maker.__name__}/{seed}")
    tasks = sorted(maker(rng), key=lambda t: t.arrival_s)
    return Trace(name, tuple(tasks), slow_boot=slow)

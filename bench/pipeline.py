"""Pipeline: does the device wait on the network while work is queued?

One broker and one agent with one slot (one device, one stream of work). A stream of ``tasks``
tasks, each a 64 MiB float32 matrix ``a`` (4096 x 4096) times a thin ``b`` (4096 x k), is
queued first, with no agent connected; then the agent starts and drains it. ``k`` is chosen
beforehand from the agent's own billed compute so that one task computes for about
``compute_s`` (50 ms) on the agent's device, whatever that device is.

The figure is the device's busy fraction: the tasks' billed ``compute_seconds`` summed, over
the span they ran in, from the broker's timestamps (``TaskStatus.started_at``, when a task was
assigned, and ``finished_at``, when its result was stored). With one slot the tasks' compute
cannot overlap, so the sum is time the device really was busy. ``busy_fraction`` gives it two
ways: over the whole run (from the first assignment, so the first input's transfer, which
nothing can hide, counts as idle), and in steady state, from the first task's end to the last
one's, which is what the goal is about: once work is queued, the next task's input should be
on the agent before the current compute ends. ``prefetched`` counts the tasks the broker had
assigned before it stored the previous task's result: a task assigned later was asked for only
once the device was free, so it cannot have had its input in place.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch

from bench.harness import broker_env
from bench.scenarios import MIB, Row
from gpubroker.client import Client, TaskState, TaskStatus
from tests.support.cluster import AgentProcess, BrokerProcess

__all__ = ["GOAL", "Busy", "TaskSpan", "busy_fraction", "pipeline", "spans_of"]

ROWS = 4096
"""Rows and columns of each task's input ``a``: 4096 x 4096 float32 is 64 MiB."""

MAX_COLUMNS = 4096
"""Most columns of ``b`` (and of the output): a device too fast for 50 ms at this width
gets shorter tasks rather than outputs as large as the inputs."""

GOAL = 0.95
"""The busy fraction the pipeline should reach in steady state."""


@dataclass(frozen=True, slots=True)
class TaskSpan:
    """One finished task as the broker recorded it; times in seconds on one clock."""

    started: float
    """When the broker assigned it to the agent."""
    finished: float
    """When the broker stored its result."""
    compute_s: float
    """Its billed compute."""


@dataclass(frozen=True, slots=True)
class Busy:
    """How busy the device was while the tasks ran."""

    whole: float
    """Billed compute of all tasks over the first assignment to the last result."""
    steady: float
    """Billed compute of all tasks but the first over the first result to the last."""
    span_s: float
    """The first assignment to the last result, seconds."""
    prefetched: int
    """Tasks (after the first) assigned before the previous task's result was stored."""


def busy_fraction(spans: Sequence[TaskSpan]) -> Busy:
    """The device's busy fraction over ``spans``, tasks that ran one at a time on one device.

    A task's compute ended about when its result was stored, so ``finished - compute_s`` is
    taken for when it began computing; the lag between the two (an upload and a commit) is
    about the same for every task and cancels in the steady-state span.

    Raises:
        ValueError: fewer than two tasks (a steady state needs two ends).
    """
    if len(spans) < 2:
        raise ValueError(f"need at least two tasks, got {len(spans)}")
    ordered = sorted(spans, key=lambda s: s.finished)
    first, last = ordered[0], ordered[-1]
    span = last.finished - min(s.started for s in ordered)
    steady_span = last.finished - first.finished
    prefetched = sum(1 for before, task in pairwise(ordered) if task.started < before.finished)
    return Busy(
        whole=sum(s.compute_s for s in ordered) / span if span > 0 else 0.0,
        steady=sum(s.compute_s for s in ordered[1:]) / steady_span if steady_span > 0 else 0.0,
        span_s=span,
        prefetched=prefetched,
    )


def spans_of(statuses: Sequence[TaskStatus]) -> list[TaskSpan]:
    """The spans of finished tasks' statuses.

    Raises:
        ValueError: a task has no start or end time.
    """
    spans = []
    for status in statuses:
        if status.started_at is None or status.finished_at is None:
            raise ValueError(f"task {status.task_id} ({status.state}) has not run to its end")
        spans.append(
            TaskSpan(
                status.started_at.timestamp(),
                status.finished_at.timestamp(),
                status.compute_seconds,
            )
        )
    return spans


def pipeline(root: Path, tasks: int, compute_s: float = 0.05) -> list[Row]:
    """Queues ``tasks`` 64 MiB tasks of about ``compute_s`` each, then one agent drains them."""
    shutil.rmtree(root, ignore_errors=True)  # a fresh database: no tasks of an earlier run
    root.mkdir(parents=True)
    broker = BrokerProcess(root, heartbeat_s=5.0, lease_timeout_s=15.0, env=broker_env()).start()
    agents: list[AgentProcess] = []

    def agent(name: str) -> AgentProcess:
        agents.append(AgentProcess(root, broker.address, name, slots=1).start())
        return agents[-1]

    a = torch.randn(ROWS, ROWS)
    try:
        with Client(broker.address, "key-a") as client:
            calibrating = agent("pipeline-calibrate")
            columns, alone_s = _calibrate(client, a, compute_s)
            calibrating.stop()
            b = torch.randn(ROWS, columns)
            started = time.perf_counter()
            handles = [client.submit("matmul", [a, b]) for _ in range(tasks)]
            submit_s = time.perf_counter() - started
            agent("pipeline")
            statuses = [h.wait(timeout=600) for h in handles]
    finally:
        for running in agents:
            running.stop()
        broker.stop()
    failed = [s for s in statuses if s.state is not TaskState.SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} pipeline task(s) failed: {failed[0]}")
    busy = busy_fraction(spans_of(statuses))
    input_mib = (a.numel() + b.numel()) * a.element_size() / MIB
    computes = [s.compute_seconds for s in statuses]
    scenario = f"pipeline: {tasks} x {input_mib:.0f} MiB, matmul @ 4096x{columns}"
    return [
        Row(scenario, f"device busy, steady state (goal >= {GOAL:.0%})", "%", busy.steady * 100),
        Row(scenario, "device busy, whole run (first input's transfer too)", "%",
            busy.whole * 100),
        Row(scenario, f"compute per task, median (aim {compute_s * 1e3:g} ms; alone)", "ms",
            statistics.median(computes) * 1e3, alone_s * 1e3, False),
        Row(scenario, "tasks assigned before the previous result (of all)", "tasks",
            busy.prefetched, tasks - 1),
        Row(scenario, "throughput", "tasks/s", tasks / busy.span_s),
        Row(scenario, "input throughput", "MiB/s", tasks * input_mib / busy.span_s),
        Row(scenario, "submit, queueing the inputs (no agent)", "MiB/s",
            tasks * input_mib / submit_s),
    ]  # fmt: skip


def _calibrate(client: Client, a: torch.Tensor, compute_s: float) -> tuple[int, float]:
    """The columns of ``b`` for about ``compute_s`` per task on the agent's device, from its
    billed compute (the median of five runs per width), and that width's compute."""
    _compute(client, a, 16)  # the first call of a shape pays for the library's set-up
    columns = 16
    for _ in range(4):
        took = _compute(client, a, columns)
        wanted = max(1, min(MAX_COLUMNS, round(columns * compute_s / max(took, 1e-6))))
        if abs(wanted - columns) <= max(1, columns // 20) or wanted == columns:
            return columns, took
        columns = wanted
    return columns, _compute(client, a, columns)


def _compute(client: Client, a: torch.Tensor, columns: int) -> float:
    b = torch.randn(ROWS, columns)
    return statistics.median(
        client.run("matmul", [a, b], timeout=120).status.compute_seconds for _ in range(5)
    )

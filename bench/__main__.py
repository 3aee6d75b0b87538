"""``make bench`` / ``python -m bench``: every scenario, broker vs direct gRPC, in one run."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from bench.batching import batching
from bench.pipeline import pipeline
from bench.scenarios import Row, billing_overhead, large_tensors, queue_depth, tiny_tasks
from tests.support.cluster import AGENT_DEVICE_ENV

SCENARIOS = ("large", "tiny", "queue", "billing", "batching", "pipeline")


@click.command()
@click.option(
    "--scenario",
    "chosen",
    multiple=True,
    type=click.Choice(SCENARIOS),
    help="Run only these (repeat the option for several).",
)
@click.option("--quick", is_flag=True, help="Smaller sizes and counts (a smoke run).")
@click.option(
    "--queue-tasks",
    type=int,
    help="Tasks in the queue scenario (default 50000; 100000 takes ~11 min in all).",
)
@click.option(
    "--pipeline-tasks",
    type=int,
    help="Tasks in the pipeline scenario (default 40; 16 with --quick).",
)
@click.option(
    "--pipeline-compute-ms",
    type=click.FloatRange(min=1),
    default=50.0,
    show_default=True,
    help="Compute per task the pipeline scenario aims for on the agent's device.",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("bench-results.json"), show_default=True
)
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default=Path("/tmp/gpubroker-bench"),
    show_default=True,
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    envvar=AGENT_DEVICE_ENV,
    help="Where the agent and the direct server run the work (cuda on a GPU machine).",
)
def main(
    chosen: tuple[str, ...],
    quick: bool,
    queue_tasks: int | None,
    pipeline_tasks: int | None,
    pipeline_compute_ms: float,
    out: Path,
    work_dir: Path,
    device: str,
) -> None:
    """Runs the benchmarks and prints medians with the broker/direct ratio.

    \b
    large     echo round trips of 64 and 512 MiB tensors, broker vs a direct gRPC server
    tiny      echo of 16 bytes: latency, and throughput with 1 and 8 clients (run, map)
    queue     50,000 tasks queued with no agent (submit rate, memory), then drained
    billing   the usage ledger's cost: two brokers, ledger on vs off
    batching  dynamic batching of a small model: on ("broker" column) vs off ("direct")
    pipeline  40 queued tasks of a 64 MiB input and ~50 ms of compute on one agent with
              one slot: how much of the time the device is busy (goal >= 95 % in steady
              state, i.e. it never waits for the next input while work is queued)

    Rows with no "direct" figure compare nothing; for pipeline, the "direct" column holds
    the reference: the compute of one task run alone, and the most tasks that could be
    assigned ahead. Every broker started here has its per-tenant submit rate and queue cap
    lifted (GPUBROKER_SUBMIT_RATE, GPUBROKER_SUBMIT_BURST, GPUBROKER_MAX_QUEUED_PER_TENANT),
    as the bench measures the broker, not its limiter; set them in the environment to bench
    with limits on.
    """
    os.environ[AGENT_DEVICE_ENV] = device  # read by the agent processes and the direct server
    console = Console(width=150)
    rows: list[Row] = []
    started = time.perf_counter()
    for name in chosen or SCENARIOS:
        console.print(f"[bold]running {name}[/] ({time.perf_counter() - started:.0f}s so far)")
        if name == "pipeline":
            tasks = pipeline_tasks or (16 if quick else 40)
            rows += pipeline(work_dir / "pipeline", tasks, pipeline_compute_ms / 1e3)
        else:
            rows += _run(name, quick, queue_tasks, work_dir)
    console.print(_table(rows))
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": _cpus(),
                    "python": platform.python_version(),
                    "device": device,
                },
                "seconds": round(time.perf_counter() - started, 1),
                "rows": [{**asdict(r), "ratio": r.ratio} for r in rows],
            },
            indent=2,
        )
    )
    console.print(f"results written to {out} in {time.perf_counter() - started:.0f}s")


def _run(name: str, quick: bool, queue_tasks: int | None, work_dir: Path) -> list[Row]:
    if name == "large":
        sizes = [64] if quick else [64, 512]
        return large_tensors(work_dir, sizes, [256, 1024, 4096], reps=2 if quick else 3)
    if name == "tiny":
        return tiny_tasks(
            work_dir,
            sequential=100 if quick else 300,
            per_client=25 if quick else 100,
            clients=8,
            reps=2 if quick else 3,
            mapped=250 if quick else 1000,
        )
    if name == "batching":
        return batching(work_dir / "batching", requests=500 if quick else 2000, callers=16,
                        reps=1 if quick else 3)  # fmt: skip
    if name == "queue":
        return queue_depth(work_dir, queue_tasks or (2_000 if quick else 50_000), concurrency=32)
    return billing_overhead(
        work_dir, per_client=250 if quick else 500, clients=8, reps=2 if quick else 8
    )


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _table(rows: list[Row]) -> Table:
    table = Table(
        "scenario",
        "metric",
        "unit",
        "broker",
        "direct",
        "broker/direct",
        title="gpubroker benchmarks (medians)",
    )
    for row in rows:
        ratio = row.ratio
        table.add_row(
            row.scenario,
            row.metric,
            row.unit,
            f"{row.broker:,.2f}",
            "" if row.direct is None else f"{row.direct:,.2f}",
            "" if ratio is None else f"{ratio:.0%}",
        )
    return table


if __name__ == "__main__":
    main()

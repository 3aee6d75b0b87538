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
from bench.scenarios import Row, billing_overhead, large_tensors, queue_depth, tiny_tasks
from tests.support.cluster import AGENT_DEVICE_ENV

SCENARIOS = ("large", "tiny", "queue", "billing", "batching")


@click.command()
@click.option(
    "--scenario", "chosen", multiple=True, type=click.Choice(SCENARIOS), help="Run only these."
)
@click.option("--quick", is_flag=True, help="Smaller sizes and counts (a smoke run).")
@click.option(
    "--queue-tasks",
    type=int,
    help="Tasks in the queue scenario (default 50000; 100000 takes ~11 min in all).",
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
    out: Path,
    work_dir: Path,
    device: str,
) -> None:
    """Runs the benchmarks and prints medians with the broker/direct ratio.

    The batching scenario compares the broker with itself: batching on in the "broker" column,
    off in the "direct" one, so its ratio is on/off.
    """
    os.environ[AGENT_DEVICE_ENV] = device  # read by the agent processes and the direct server
    console = Console(width=150)
    rows: list[Row] = []
    started = time.perf_counter()
    for name in chosen or SCENARIOS:
        console.print(f"[bold]running {name}[/] ({time.perf_counter() - started:.0f}s so far)")
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

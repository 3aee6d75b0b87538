"""``make cost`` / ``python -m bench.cost``: every policy on every trace, averaged over seeds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from bench.cost.frontier import (
    BASELINES,
    GRID,
    Beat,
    Point,
    Setting,
    best_within,
    frontier_table,
)
from bench.cost.policies import AlwaysOn, Autostop, Oracle, Ours
from bench.cost.sim import (
    FAST_BOOT_S,
    SLOW_BOOT_S,
    Controller,
    RunResult,
    SimConfig,
    Simulation,
    percentile,
)
from bench.cost.traces import TRACES, make_trace
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.scaling.config import load_scaling_config
from gpubroker.broker.scaling.policy import ScalingPolicy

SCALING_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "scaling-gce.toml"
"""The production parameters the real policy runs with."""
POLICIES = (
    "ours",
    "ours-delay-150s",
    "ours-delay-45min",
    "always-on",
    "autostop-5min",
    "autostop-0s",
    "oracle",
)
"""``ours`` is the deployed policy; the ``ours-delay-*`` rows set its ``max_queue_delay_s``."""
SEEDS = (0, 1, 2)


@dataclass(frozen=True, slots=True)
class Summary:
    """One policy on one trace, over the seeds: sums for money, means per seed otherwise."""

    vm_cost_usd: float
    billed_usd: float
    wait_p50_s: float
    wait_p95_s: float
    launches: float
    never_ran: float

    @property
    def billed_over_vm(self) -> float:
        """Billed compute over VM cost (1.0: no GPU second paid for sat idle)."""
        return self.billed_usd / self.vm_cost_usd if self.vm_cost_usd else 0.0


def setup(config_path: Path = SCALING_CONFIG) -> tuple[ScalingPolicy, SimConfig, int]:
    """The policy as the broker loads it for gce, the matching simulator rules, the price."""
    catalog = PriceCatalog.load()
    scaling = load_scaling_config(config_path, "gce", catalog)
    policy = scaling.policy
    request = policy.launch_request
    price = catalog.price_for(request.gpu_types[0], spot=request.spot).per_hour_nanousd
    config = SimConfig(
        slots=policy.slots_per_instance,
        max_instances=policy.max_instances,
        interval_s=scaling.interval_s,
        billing_minimum_s=policy.billing_minimum_s,
        price_per_hour_usd=price / 1e9,
    )
    return policy, config, price


def controller(name: str, policy: ScalingPolicy, config: SimConfig, price: int) -> Controller:
    """A fresh controller for the policy ``name`` (one of ``POLICIES``)."""
    makers: dict[str, Callable[[], Controller]] = {
        "ours": lambda: Ours(policy, price),
        "ours-delay-150s": lambda: Ours(replace(policy, max_queue_delay_s=150.0), price),
        "ours-delay-45min": lambda: Ours(replace(policy, max_queue_delay_s=2700.0), price),
        "always-on": AlwaysOn,
        "autostop-5min": lambda: Autostop(300.0),
        "autostop-0s": lambda: Autostop(0.0),
        "oracle": lambda: Oracle(config.boot_range_s[1]),
    }
    return makers[name]()


def simulate(
    trace_name: str, policy_name: str, seeds: Sequence[int], tuned: Setting | None = None
) -> Summary:
    """``policy_name`` on ``trace_name`` for every seed, summarised; ``tuned``: our policy
    with those knobs instead (``policy_name`` is then ignored)."""
    policy, base, price = setup()
    runs: list[RunResult] = []
    for seed in seeds:
        trace = make_trace(trace_name, seed)
        config = replace(base, boot_range_s=SLOW_BOOT_S if trace.slow_boot else FAST_BOOT_S)
        if tuned is None:
            control = controller(policy_name, policy, config, price)
        else:
            control = Ours(tuned.apply(policy), price)
        runs.append(Simulation(trace, control, config, seed).run())
    n = len(runs)
    return Summary(
        vm_cost_usd=sum(r.vm_cost_usd for r in runs),
        billed_usd=sum(r.billed_usd for r in runs),
        wait_p50_s=sum(percentile(r.waits_s, 0.5) for r in runs) / n,
        wait_p95_s=sum(percentile(r.waits_s, 0.95) for r in runs) / n,
        launches=sum(r.launches for r in runs) / n,
        never_ran=sum(r.never_ran for r in runs) / n,
    )


def _table(trace: str, rows: dict[str, Summary], seeds: int) -> Table:
    table = Table(title=f"{trace} (sums over {seeds} seeds; waits, launches: mean per seed)")
    for column in ("policy", "VM cost $", "billed $", "billed / VM", "p50 wait s", "p95 wait s"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    table.add_column("launches", justify="right")
    table.add_column("never ran a task", justify="right")
    for name, s in rows.items():
        table.add_row(
            name,
            f"{s.vm_cost_usd:.2f}",
            f"{s.billed_usd:.2f}",
            f"{s.billed_over_vm:.1%}",
            f"{s.wait_p50_s:.0f}",
            f"{s.wait_p95_s:.0f}",
            f"{s.launches:.1f}",
            f"{s.never_ran:.1f}",
        )
    return table


@click.command()
@click.option("--trace", "chosen", multiple=True, type=click.Choice(TRACES), help="Only these.")
@click.option("--seeds", type=int, default=len(SEEDS), show_default=True, help="Seeds 0..N-1.")
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("cost-results.json"), show_default=True
)
@click.option(
    "--frontier/--no-frontier",
    default=True,
    show_default=True,
    help="Also run our policy at each setting of its knobs and say which baselines it beats "
    "(about a minute more).",
)
def main(chosen: tuple[str, ...], seeds: int, out: Path, frontier: bool) -> None:
    """Simulates every policy on every trace under GCE's rules and prints what each costs."""
    console = Console(width=150)
    started = time.perf_counter()
    results: dict[str, dict[str, dict[str, float]]] = {}
    beats: dict[str, list[Beat]] = {}
    for trace in chosen or TRACES:
        rows = {p: simulate(trace, p, range(seeds)) for p in POLICIES}
        console.print(_table(trace, rows, seeds))
        if frontier:
            beats[trace] = _beats(trace, rows, range(seeds))
        results[trace] = {
            p: {
                "billed_over_vm": round(s.billed_over_vm, 4),
                "wait_p50_s": round(s.wait_p50_s, 1),
                "wait_p95_s": round(s.wait_p95_s, 1),
                "launches": s.launches,
                "never_ran": s.never_ran,
                "vm_cost_usd": round(s.vm_cost_usd, 4),
                "billed_usd": round(s.billed_usd, 4),
            }
            for p, s in rows.items()
        }
    if frontier:
        console.print(frontier_table(beats))
    seconds = round(time.perf_counter() - started, 1)
    report = {"seeds": seeds, "seconds": seconds, "traces": results, "frontier": _json(beats)}
    out.write_text(json.dumps(report, indent=1))
    console.print(f"wrote {out} in {seconds} s")


def _beats(trace: str, rows: dict[str, Summary], seeds: Sequence[int]) -> list[Beat]:
    """Our policy at every setting of ``GRID`` against each baseline on ``trace``."""
    with ProcessPoolExecutor() as pool:  # independent runs: one per core
        summaries = pool.map(_tuned, [(trace, tuple(seeds), s) for s in GRID])
        ours = {
            s.name: Point(r.billed_over_vm, r.wait_p95_s)
            for s, r in zip(GRID, summaries, strict=True)
        }
    return [
        best_within(b, Point(rows[b].billed_over_vm, rows[b].wait_p95_s), ours) for b in BASELINES
    ]


def _tuned(job: tuple[str, tuple[int, ...], Setting]) -> Summary:
    trace, seeds, setting = job
    return simulate(trace, "ours", seeds, setting)


def _json(beats: dict[str, list[Beat]]) -> dict[str, list[dict[str, object]]]:
    return {
        trace: [
            {
                "baseline": b.baseline,
                "baseline_billed_over_vm": round(b.target.billed_over_vm, 4),
                "baseline_wait_p95_s": round(b.target.wait_p95_s, 1),
                "setting": b.setting,
                "billed_over_vm": None if b.reached is None else round(b.reached.billed_over_vm, 4),
                "wait_p95_s": None if b.reached is None else round(b.reached.wait_p95_s, 1),
                "verdict": b.verdict,
            }
            for b in rows
        ]
        for trace, rows in beats.items()
    }


if __name__ == "__main__":
    main()

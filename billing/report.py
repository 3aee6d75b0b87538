"""Renders usage summaries, and VM cost beside billed compute, as a table, CSV or JSON.

Every report ends with a totals row that adds up exactly.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from gpubroker.billing.ledger import UsageSummary
from gpubroker.billing.prices import format_usd
from gpubroker.billing.vms import OverheadLine, overhead_total

__all__ = ["FORMATS", "render", "render_overhead"]

FORMATS = ("table", "csv", "json")

_COLUMNS = (
    "group",
    "tasks",
    "compute_s",
    "mean_queue_wait_s",
    "bytes_in",
    "bytes_out",
    "cost_usd",
)


def _total(summaries: Sequence[UsageSummary]) -> UsageSummary:
    tasks = sum(s.tasks for s in summaries)
    waited = sum(s.queue_wait_seconds * s.tasks for s in summaries)
    return UsageSummary(
        key="TOTAL",
        tasks=tasks,
        compute_seconds=sum(s.compute_seconds for s in summaries),
        queue_wait_seconds=waited / tasks if tasks else 0.0,
        bytes_in=sum(s.bytes_in for s in summaries),
        bytes_out=sum(s.bytes_out for s in summaries),
        cost_nanousd=sum(s.cost_nanousd for s in summaries),
    )


def _usd(nanousd: int) -> str:
    """Dollars as a plain fixed-point decimal string, e.g. ``0.017750000`` (never ``1E-9``)."""
    return format_usd(nanousd).removeprefix("$")


def _cells(s: UsageSummary) -> list[str]:
    return [
        s.key,
        str(s.tasks),
        f"{s.compute_seconds:.6f}",
        f"{s.queue_wait_seconds:.3f}",
        str(s.bytes_in),
        str(s.bytes_out),
        _usd(s.cost_nanousd),
    ]


def _json_row(by: str, s: UsageSummary) -> dict[str, Any]:
    """Counts as JSON integers, seconds as JSON numbers, money as an exact decimal string."""
    return {
        by: s.key,
        "tasks": s.tasks,
        "compute_s": s.compute_seconds,
        "mean_queue_wait_s": s.queue_wait_seconds,
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
        "cost_usd": _usd(s.cost_nanousd),
        "cost_nanousd": s.cost_nanousd,
    }


def render(summaries: Sequence[UsageSummary], fmt: str, by: str = "tenant") -> str:
    """Returns the report in ``fmt`` (one of ``FORMATS``), one row per ``by`` group, totals last.

    Raises:
        ValueError: ``fmt`` is not one of ``FORMATS``.
    """
    total = _total(summaries)
    if fmt == "json":
        return _json(summaries, total, by)
    if fmt == "csv":
        return _csv([*summaries, total], by)
    if fmt == "table":
        return _table(summaries, total, by)
    raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _json(summaries: Sequence[UsageSummary], total: UsageSummary, by: str) -> str:
    report = {
        "by": by,
        "groups": [_json_row(by, s) for s in summaries],
        "total": _json_row(by, total),
    }
    return json.dumps(report, indent=2) + "\n"


def _csv(rows: Sequence[UsageSummary], by: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((by, *_COLUMNS[1:]))
    writer.writerows(_cells(s) for s in rows)
    return out.getvalue()


def _table(summaries: Sequence[UsageSummary], total: UsageSummary, by: str) -> str:
    label = by.replace("_", " ")
    table = Table(title=f"Usage by {label} (billed compute time only)")
    table.add_column(label)
    for heading in ("tasks", "compute s", "mean wait s", "bytes in", "bytes out", "cost"):
        table.add_column(heading, justify="right")
    for s in summaries:
        table.add_row(*_cells(s)[:-1], format_usd(s.cost_nanousd))
    table.add_section()
    table.add_row(*_cells(total)[:-1], format_usd(total.cost_nanousd), style="bold")
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(table)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


_OVERHEAD_COLUMNS = (
    "gpu_type",
    "vms",
    "vm_s",
    "boot_s",
    "vm_cost_usd",
    "boot_cost_usd",
    "tasks",
    "compute_s",
    "billed_usd",
    "idle_overhead_usd",
    "idle_overhead_pct",
)


def _percent(line: OverheadLine) -> str | None:
    """Idle overhead % to two places, half-up; None without machine cost."""
    percent = line.idle_percent
    if percent is None:
        return None
    return f"{percent.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):f}"


def _overhead_cells(line: OverheadLine) -> list[str]:
    return [
        line.gpu_type,
        str(line.vms),
        f"{line.vm_seconds:.6f}",
        f"{line.boot_seconds:.6f}",
        _usd(line.vm_cost_nanousd),
        _usd(line.boot_cost_nanousd),
        str(line.tasks),
        f"{line.compute_seconds:.6f}",
        _usd(line.billed_nanousd),
        _usd(line.idle_nanousd),
        _percent(line) or "",
    ]


def _overhead_json_row(line: OverheadLine) -> dict[str, Any]:
    """As ``_json_row``: counts and seconds as numbers, money and percentages as exact strings."""
    return {
        "gpu_type": line.gpu_type,
        "vms": line.vms,
        "vm_s": float(line.vm_seconds),
        "vm_cost_usd": _usd(line.vm_cost_nanousd),
        "vm_cost_nanousd": line.vm_cost_nanousd,
        "boot_s": float(line.boot_seconds),
        "boot_cost_usd": _usd(line.boot_cost_nanousd),
        "boot_cost_nanousd": line.boot_cost_nanousd,
        "tasks": line.tasks,
        "compute_s": line.compute_seconds,
        "billed_usd": _usd(line.billed_nanousd),
        "billed_nanousd": line.billed_nanousd,
        "idle_overhead_usd": _usd(line.idle_nanousd),
        "idle_overhead_nanousd": line.idle_nanousd,
        "idle_overhead_pct": _percent(line),
    }


def render_overhead(lines: Sequence[OverheadLine], fmt: str) -> str:
    """Returns VM cost beside billed compute in ``fmt``, one row per GPU type, totals last.

    VM time and cost run from each machine's ``RUNNING`` to its deletion, with the provider's
    minimum (``gpubroker.billing.vms``); the boot columns are the part of them before the agent
    connected. Idle overhead is VM cost less billed compute, boot included.

    Raises:
        ValueError: ``fmt`` is not one of ``FORMATS``.
    """
    total = overhead_total(lines)
    if fmt == "json":
        report = {
            "by": "gpu_type",
            "groups": [_overhead_json_row(line) for line in lines],
            "total": _overhead_json_row(total),
        }
        return json.dumps(report, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_OVERHEAD_COLUMNS)
        writer.writerows(_overhead_cells(line) for line in [*lines, total])
        return out.getvalue()
    if fmt == "table":
        return _overhead_table(lines, total)
    raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _overhead_table(lines: Sequence[OverheadLine], total: OverheadLine) -> str:
    table = Table(
        title="VM cost beside billed compute by GPU type",
        caption=(
            "VM time: RUNNING to deletion, GCE's 60 s minimum (none for local agents); "
            "boot: RUNNING to agent connected, part of VM time\n"
            "idle overhead = VM cost - billed compute (billed at tenant prices), boot included"
        ),
    )
    table.add_column("gpu type")
    headings = ("VMs", "VM s", "boot s", "VM cost", "boot cost", "tasks", "compute s", "billed")
    for heading in (*headings, "idle", "idle %"):
        table.add_column(heading, justify="right")
    for line in lines:
        table.add_row(*_overhead_table_cells(line))
    table.add_section()
    table.add_row(*_overhead_table_cells(total), style="bold")
    return _printed(table)


def _overhead_table_cells(line: OverheadLine) -> list[str]:
    return [
        line.gpu_type,
        str(line.vms),
        f"{line.vm_seconds:.6f}",
        f"{line.boot_seconds:.6f}",
        format_usd(line.vm_cost_nanousd),
        format_usd(line.boot_cost_nanousd),
        str(line.tasks),
        f"{line.compute_seconds:.6f}",
        format_usd(line.billed_nanousd),
        format_usd(line.idle_nanousd),
        _percent(line) or "n/a",
    ]


def _printed(table: Table) -> str:
    console = Console(file=io.StringIO(), width=140, force_terminal=False)
    console.print(table)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()

"""Renders usage summaries as a table, CSV or JSON, with a totals row that adds up exactly."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from billing.ledger import UsageSummary
from billing.prices import format_usd

__all__ = ["FORMATS", "render"]

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

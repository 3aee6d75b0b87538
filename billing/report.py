"""Renders usage summaries as a table, CSV or JSON, with a totals row that adds up exactly."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from decimal import Decimal

from rich.console import Console
from rich.table import Table

from billing.ledger import UsageSummary
from billing.prices import NANO, format_usd

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


def _cells(s: UsageSummary) -> list[str]:
    return [
        s.key,
        str(s.tasks),
        f"{s.compute_seconds:.6f}",
        f"{s.queue_wait_seconds:.3f}",
        str(s.bytes_in),
        str(s.bytes_out),
        str(Decimal(s.cost_nanousd) / NANO),
    ]


def render(summaries: Sequence[UsageSummary], fmt: str, by: str = "tenant") -> str:
    """Returns the report in ``fmt`` (one of ``FORMATS``), one row per ``by`` group, totals last."""
    rows = [*summaries, _total(summaries)]
    columns = (by, *_COLUMNS[1:])
    if fmt == "json":
        return json.dumps(
            {
                "by": by,
                "groups": [dict(zip(columns, _cells(s), strict=True)) for s in summaries],
                "total": dict(zip(columns, _cells(rows[-1]), strict=True)),
            },
            indent=2,
        )
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(_cells(s) for s in rows)
        return out.getvalue()
    table = Table(
        by.replace("_", " "),
        "tasks",
        "compute s",
        "mean wait s",
        "bytes in",
        "bytes out",
        "cost",
        title=f"Usage by {by.replace('_', ' ')} (billed compute time only)",
    )
    for s in rows:
        cells = _cells(s)
        cells[-1] = format_usd(s.cost_nanousd)
        table.add_row(*cells, style="bold" if s.key == "TOTAL" else None)
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(table)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()

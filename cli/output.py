"""What the client commands print: rich tables for people, ``--json`` for programs."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from gpubroker.client import Model, TaskStatus

__all__ = [
    "echo_json",
    "json_option",
    "model_dict",
    "print_pairs",
    "print_table",
    "status_dict",
    "when",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def json_option(command: _F) -> _F:
    """``--json``: print the data as JSON on stdout instead of a table."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON on stdout instead of a table."
    )(command)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, str | int) else value.name
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot print {type(value).__name__} as JSON")


def echo_json(data: Any) -> None:
    """Prints ``data`` as indented JSON (datetimes in ISO 8601, enums by value)."""
    click.echo(json.dumps(data, indent=2, default=_plain, sort_keys=False))


def status_dict(status: TaskStatus) -> dict[str, Any]:
    """A task's status as plain data for ``--json``."""
    data = dataclasses.asdict(status)
    data["state"] = status.state.name
    return data


def model_dict(model: Model) -> dict[str, Any]:
    """A model as plain data for ``--json``."""
    return dataclasses.asdict(model)


def when(moment: datetime | None) -> str:
    """A time for a table: UTC, to the second; empty for none."""
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


_PIPE_WIDTH = 1000
"""Columns a table may take when stdout is not a terminal: ids are never wrapped in a pipe."""


def _console() -> Console:
    console = Console(soft_wrap=False)
    if not console.is_terminal:
        console = Console(soft_wrap=False, width=_PIPE_WIDTH)
    return console


def print_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], title: str | None = None
) -> None:
    """Prints a table with a header row."""
    table = Table(*columns, title=title, title_justify="left")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    _console().print(table)


def print_pairs(pairs: Iterable[tuple[str, object]], title: str | None = None) -> None:
    """Prints ``name: value`` lines as a two-column table, empty values left out."""
    table = Table(show_header=False, title=title, title_justify="left", box=None)
    table.add_column(style="bold")
    table.add_column()
    for name, value in pairs:
        if value not in (None, "", (), 0, 0.0):
            table.add_row(name, str(value))
    _console().print(table)

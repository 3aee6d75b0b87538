"""The hottest INSERTs, rendered once per dialect and run through the driver.

Each runs for every task on the broker's busiest thread (the database thread), where
SQLAlchemy Core's per-execution work (the compiled-cache lookup, building the parameters,
setting up the result) cost more than the statement: a usage row ~20 of its ~28 us on SQLite,
a task row 30 of its ~70 us. The SQL is still SQLAlchemy's, compiled for the
connection's dialect, and every value goes through its column type's own bind processor, so
what lands in the row is what ``conn.execute(statement)`` would have written (the tests that
use these write rows both ways on SQLite and PostgreSQL and compare them).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.dml import Insert

from gpubroker.billing.models import UtcDateTime

__all__ = ["DriverInsert"]


@dataclass(frozen=True, slots=True)
class DriverInsert:
    """An INSERT of one table's named columns, compiled for one dialect."""

    sql: str
    pick: Callable[[Mapping[str, Any]], tuple[Any, ...]] | None
    """The values in column order for a positional paramstyle (SQLite's ``?``); None for a
    named one (psycopg's)."""
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]
    """The columns whose values the dialect converts, with the conversion."""

    @classmethod
    def compile(cls, insert: Insert, columns: Sequence[str], dialect: Dialect) -> DriverInsert:
        """``insert`` (a table's INSERT, with any ``ON CONFLICT`` or ``RETURNING`` already on
        it) of ``columns``, compiled for ``dialect``."""
        table = insert.table
        assert isinstance(table, sa.Table)
        statement = insert.values({c: sa.bindparam(c) for c in columns})
        compiled = statement.compile(dialect=dialect)
        order = compiled.positiontup
        pick = _pick(tuple(order)) if compiled.positional and order is not None else None
        processors = []
        for name in columns:
            column_type = table.c[name].type
            convert = column_type.dialect_impl(dialect).bind_processor(dialect)
            if convert is None:
                continue
            if isinstance(column_type, UtcDateTime) and all(
                convert(t) == _utc_text(t) for t in _SAMPLE_TIMES
            ):
                convert = _utc_text  # the same text, 6x faster
            processors.append((name, convert))
        return cls(str(compiled), pick, tuple(processors))

    def parameters(self, row: Mapping[str, Any]) -> Any:
        """The driver's parameters for one row (column name -> value)."""
        values = dict(row)
        for name, convert in self.processors:
            values[name] = convert(values[name])
        return values if self.pick is None else self.pick(values)

    def insert(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Inserts the rows with the driver's ``executemany``."""
        conn.exec_driver_sql(self.sql, [self.parameters(row) for row in rows])

    def insert_returning(self, conn: Connection, row: Mapping[str, Any]) -> Any:
        """Inserts one row on the driver's own cursor and returns the first row its
        ``RETURNING`` gave, or None. The cursor skips even ``exec_driver_sql``'s set-up, a
        third of a task row's insert; a driver error is raised as SQLAlchemy's
        (``sa.exc.IntegrityError``, ...), as ``conn.execute`` would raise it."""
        params = self.parameters(row)
        error = conn.dialect.loaded_dbapi.Error
        cursor = conn.connection.cursor()
        try:
            cursor.execute(self.sql, params)
            return cursor.fetchone()
        except error as exc:
            raise sa.exc.DBAPIError.instance(self.sql, params, exc, error) from exc
        finally:
            cursor.close()


def _pick(order: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    if len(order) == 1:
        return lambda values: (values[order[0]],)
    getter = operator.itemgetter(*order)
    return lambda values: tuple(getter(values))


def _utc_text(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}; pass an aware UTC datetime")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


_SAMPLE_TIMES = (
    datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    datetime(2026, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5))),
)
"""Where the fast formatter must agree with the dialect's processor before it is used."""

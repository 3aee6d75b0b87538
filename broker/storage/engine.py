"""The broker's SQL engine: SQLite in WAL mode with full fsync, or any SQLAlchemy URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

__all__ = ["create_engine"]


def create_engine(url: str) -> Engine:
    """Creates an engine; SQLite gets WAL and full fsync so an acknowledged task survives."""
    if url.startswith("sqlite") and ":memory:" not in url and url.count("/") >= 3:
        path = url.split("///", 1)[1]
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()

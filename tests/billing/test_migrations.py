"""Alembic migrations, up and down, on SQLite and PostgreSQL; the broker's start-up check."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gpubroker.billing.migrate import (
    FIRST_REVISION,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
)
from gpubroker.billing.models import metadata
from gpubroker.broker.config import Settings
from gpubroker.broker.errors import SchemaOutdatedError
from gpubroker.broker.server import create_server


def _differences(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def test_upgrading_an_empty_database_builds_exactly_the_models_schema(
    empty_engine: sa.Engine,
) -> None:
    upgrade(empty_engine)

    assert current_revision(empty_engine) == head_revision()
    assert _differences(empty_engine) == []


def test_downgrading_to_base_removes_every_table(empty_engine: sa.Engine) -> None:
    upgrade(empty_engine)

    downgrade(empty_engine, "base")

    assert current_revision(empty_engine) is None
    assert set(sa.inspect(empty_engine).get_table_names()) <= {"alembic_version"}


def test_up_down_up_round_trips(empty_engine: sa.Engine) -> None:
    upgrade(empty_engine)
    downgrade(empty_engine, "base")

    upgrade(empty_engine)

    assert _differences(empty_engine) == []


def test_a_database_made_before_migrations_is_adopted(empty_engine: sa.Engine) -> None:
    # What brokers before migrations built: revision 0001's tables, no version table.
    upgrade(empty_engine, FIRST_REVISION)
    with empty_engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alembic_version"))

    upgrade(empty_engine)

    assert current_revision(empty_engine) == head_revision()
    assert _differences(empty_engine) == []


async def test_the_broker_refuses_an_unmigrated_database_unless_asked(tmp_path: Path) -> None:
    settings = Settings(
        listen_address="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'b.db'}",
        spool_dir=tmp_path / "spool",
    )

    with pytest.raises(SchemaOutdatedError, match="make migrate"):
        await create_server(settings)
    server = await create_server(dataclasses.replace(settings, migrate=True))
    await server.stop(grace=None)

    engine = sa.create_engine(settings.database_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()

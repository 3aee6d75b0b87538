"""Shared fixtures, one marked section per concern; add new ones in a section of their own."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from gpubroker.billing.models import metadata
from gpubroker.broker.server import BrokerServer
from tests.support.cluster import broker_settings, running_broker

# ---------------------------------------------------------------------------------------------
# Databases. Every store and ledger test runs on SQLite and on PostgreSQL.
#
# PostgreSQL is the real server on 127.0.0.1:5432 (trust auth, psycopg 3); each test session
# creates its own database and drops it at the end. Its tests are skipped only when the server
# cannot be reached.
# ---------------------------------------------------------------------------------------------

PG_ADMIN_URL = os.environ.get(
    "GPUBROKER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session; dropped at the end."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"gpubroker_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            # FORCE (PostgreSQL 13+) terminates connections a test left open.
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database URL, once for a fresh SQLite file and once for the PostgreSQL test database.

    The PostgreSQL database is shared by the session: use ``engine`` for a clean schema.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on ``db_url`` with the schema freshly created, and dropped afterwards."""
    engine = sa.create_engine(db_url)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    try:
        yield engine
    finally:
        metadata.drop_all(engine)
        engine.dispose()


@pytest.fixture
def empty_engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on ``db_url`` with no tables and no migration stamp (for migration tests),
    emptied again afterwards."""
    engine = sa.create_engine(db_url)
    _drop_schema(engine)
    try:
        yield engine
    finally:
        _drop_schema(engine)
        engine.dispose()


def _drop_schema(engine: sa.Engine) -> None:
    metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))


# ---------------------------------------------------------------------------------------------
# A broker in this process, on a free loopback port, its database and spool under tmp_path.
#
# A module changes its settings by overriding ``broker_overrides`` (or a test parametrizes
# it); the fields go to ``tests.support.cluster.broker_settings``. Tests that need a broker
# with settings built from other fixtures, or one per module, use ``running_broker`` directly.
# End-to-end tests run the broker as a process instead (``tests.support.cluster``).
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    """Settings fields of ``broker_server`` that differ from ``broker_settings``' defaults."""
    return {}


@pytest.fixture
async def broker_server(
    tmp_path: Path, broker_overrides: dict[str, object]
) -> AsyncIterator[BrokerServer]:
    """A running broker in this event loop, stopped after the test."""
    async with running_broker(broker_settings(tmp_path, **broker_overrides)) as server:
        yield server


@pytest.fixture
async def broker_channel(broker_server: BrokerServer) -> AsyncIterator[grpc.aio.Channel]:
    """A plaintext channel to ``broker_server``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker_server.port}") as channel:
        yield channel

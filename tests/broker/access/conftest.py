"""Fixtures shared by the access tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from gpubroker.billing.migrate import upgrade


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A migrated SQLite database file, for the admin CLI."""
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    engine = sa.create_engine(url)
    upgrade(engine)
    engine.dispose()
    return url

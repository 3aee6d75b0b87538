"""Schema migrations with Alembic: upgrade, downgrade, and what revision a database is at."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

__all__ = ["FIRST_REVISION", "current_revision", "downgrade", "head_revision", "upgrade"]


def _config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", "gpubroker.billing:migrations")
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


FIRST_REVISION = "0001"
"""The schema the broker created with ``create_all`` before migrations existed."""


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrates the database up to ``revision``.

    A database made before migrations existed (tables, no version) is adopted as revision
    0001, which it matches, and upgraded from there.
    """
    config = _config(engine)
    adopt = current_revision(engine) is None and sa.inspect(engine).has_table("tasks")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        if adopt:
            command.stamp(config, FIRST_REVISION)
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrates the database down to ``revision`` (``base`` drops everything)."""
    config = _config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for an empty (unmigrated) database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(_config_for_scripts()).get_current_head()
    assert head is not None
    return head


def _config_for_scripts() -> Config:
    config = Config()
    config.set_main_option("script_location", "gpubroker.billing:migrations")
    return config

"""``python -m billing report``: per-tenant usage from the broker's database."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import click
import sqlalchemy as sa

from billing.ledger import GROUPS, summaries
from billing.migrate import current_revision, downgrade, upgrade
from billing.models import usage
from billing.report import FORMATS, render

DEFAULT_DATABASE_URL = "sqlite:///gpubroker-data/broker.db"


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@click.group()
def cli() -> None:
    """Billing tools for the GPU broker."""


@cli.command()
@click.option(
    "--database-url",
    help="SQLAlchemy URL (default: $GPUBROKER_DATABASE_URL or the broker's SQLite file).",
)
@click.option("--since", help="Start of the range, ISO 8601 (inclusive).")
@click.option("--until", help="End of the range, ISO 8601 (exclusive).")
@click.option("--by", type=click.Choice(GROUPS), default="tenant", show_default=True)
@click.option("--tenant", help="Only this tenant's usage.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
def report(
    database_url: str | None,
    since: str | None,
    until: str | None,
    by: str,
    tenant: str | None,
    fmt: str,
) -> None:
    """Prints billed usage per tenant, workload, GPU type or UTC day."""
    url = database_url or os.environ.get("GPUBROKER_DATABASE_URL") or DEFAULT_DATABASE_URL
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise click.ClickException(f"no database at {url}; has the broker run yet?")
    engine = sa.create_engine(url)
    try:
        if not sa.inspect(engine).has_table(usage.name):
            raise click.ClickException(f"{url} has no usage table; is it the broker's database?")
        with engine.connect() as conn:
            found = summaries(conn, by=by, since=_when(since), until=_when(until), tenant=tenant)
    finally:
        engine.dispose()
    click.echo(render(found, fmt, by), nl=False)


@cli.command()
@click.option("--database-url", help="SQLAlchemy URL (default: as for report).")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.option("--down", is_flag=True, help="Downgrade to --revision (e.g. base) instead.")
def migrate(database_url: str | None, revision: str, down: bool) -> None:
    """Upgrades (or downgrades) the broker's database schema."""
    url = database_url or os.environ.get("GPUBROKER_DATABASE_URL") or DEFAULT_DATABASE_URL
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url)
    try:
        (downgrade if down else upgrade)(engine, revision)
        click.echo(f"{url} is at revision {current_revision(engine) or 'base'}")
    finally:
        engine.dispose()


if __name__ == "__main__":
    cli()

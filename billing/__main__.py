"""``python -m gpubroker.billing``: usage reports, migrations and budgets on the broker's
database."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import click
import sqlalchemy as sa

from gpubroker.billing.budget import budget_status, remove_budget, set_budget
from gpubroker.billing.errors import PriceCatalogError
from gpubroker.billing.ledger import GROUPS, summaries
from gpubroker.billing.migrate import current_revision, downgrade, upgrade
from gpubroker.billing.models import usage, vm_instances
from gpubroker.billing.prices import format_usd, to_nanousd
from gpubroker.billing.report import FORMATS, render, render_overhead
from gpubroker.billing.vms import idle_overhead
from gpubroker.env import default_data_dir

_T = TypeVar("_T")


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """Parses an ISO 8601 option; a time without a zone is UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _database_url(database_url: str | None) -> str:
    """The URL given, else ``$GPUBROKER_DATABASE_URL``, else the broker's default SQLite file
    (``broker.db`` in ``gpubroker.env.default_data_dir()``, as the broker resolves it)."""
    explicit = database_url or os.environ.get("GPUBROKER_DATABASE_URL")
    return explicit or f"sqlite:///{default_data_dir() / 'broker.db'}"


def _missing_sqlite_file(url: str) -> bool:
    """True for a SQLite file URL whose file does not exist (connecting would create it)."""
    parsed = sa.engine.make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return False
    return not Path(database).exists()


@click.group()
def cli() -> None:
    """Billing tools for the GPU broker."""


@cli.command()
@click.option(
    "--database-url",
    help=(
        "SQLAlchemy URL (default: $GPUBROKER_DATABASE_URL, else the broker's SQLite file: "
        "broker.db in $GPUBROKER_DATA_DIR, $XDG_DATA_HOME/gpubroker or ~/.local/share/gpubroker)."
    ),
)
@click.option("--since", callback=_when, help="Start of the range, ISO 8601 (inclusive).")
@click.option("--until", callback=_when, help="End of the range, ISO 8601 (exclusive).")
@click.option("--by", type=click.Choice(GROUPS), default="tenant", show_default=True)
@click.option("--tenant", help="Only this tenant's usage.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
def report(
    database_url: str | None,
    since: datetime | None,
    until: datetime | None,
    by: str,
    tenant: str | None,
    fmt: str,
) -> None:
    """Prints billed usage per tenant, workload, GPU type or UTC day."""
    found = _read(
        database_url,
        (usage,),
        lambda conn: summaries(conn, by=by, since=since, until=until, tenant=tenant),
    )
    click.echo(render(found, fmt, by), nl=False)


@cli.command()
@click.option("--database-url", help="SQLAlchemy URL (default: as for report).")
@click.option("--since", callback=_when, help="Start of the range, ISO 8601 (inclusive).")
@click.option("--until", callback=_when, help="End of the range, ISO 8601 (exclusive).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
def overhead(
    database_url: str | None, since: datetime | None, until: datetime | None, fmt: str
) -> None:
    """Prints VM cost, boot time, billed compute and idle overhead per GPU type.

    VM time runs from each VM's RUNNING to its deletion, as GCE bills it: per second, at least
    60 s per VM (no minimum for local agents), clipped to the range; VMs still running count up
    to now. Boot is the part of VM time before the VM's agent connected (all of it if it never
    did). Idle overhead is VM cost less billed compute, boot included.
    """
    now = datetime.now(UTC)
    lines = _read(
        database_url,
        (usage, vm_instances),
        lambda conn: idle_overhead(conn, since, until, now=now),
    )
    click.echo(render_overhead(lines, fmt), nl=False)


def _read(
    database_url: str | None, tables: tuple[sa.Table, ...], query: Callable[[sa.Connection], _T]
) -> _T:
    """Runs ``query`` on the broker's database, after checking that ``tables`` exist."""
    url = _database_url(database_url)
    try:
        shown = sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError as exc:
        raise click.BadParameter(str(exc), param_hint="--database-url") from exc
    if _missing_sqlite_file(url):
        raise click.ClickException(f"no database at {shown}; has the broker run yet?")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            for table in tables:
                if not sa.inspect(conn).has_table(table.name):
                    raise click.ClickException(
                        f"{shown} has no {table.name} table; is it the broker's database, "
                        "migrated (python -m gpubroker.billing migrate)?"
                    )
            return query(conn)
    except sa.exc.OperationalError as exc:
        raise click.ClickException(f"cannot read {shown}: {exc.orig}") from exc
    finally:
        engine.dispose()


@cli.command()
@click.option("--database-url", help="SQLAlchemy URL (default: as for report).")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.option("--down", is_flag=True, help="Downgrade to --revision (e.g. base) instead.")
def migrate(database_url: str | None, revision: str, down: bool) -> None:
    """Upgrades (or downgrades) the broker's database schema."""
    url = _database_url(database_url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url)
    try:
        (downgrade if down else upgrade)(engine, revision)
        click.echo(f"{url} is at revision {current_revision(engine) or 'base'}")
    finally:
        engine.dispose()


@cli.group()
def budget() -> None:
    """Per-tenant monthly budgets (calendar months, UTC)."""


@budget.command("set")
@click.argument("tenant")
@click.argument("amount_usd")
@click.option("--database-url", help="SQLAlchemy URL (default: as for report).")
def budget_set(tenant: str, amount_usd: str, database_url: str | None) -> None:
    """Sets TENANT's monthly limit to AMOUNT_USD (a decimal, e.g. 25.00)."""
    try:
        limit = to_nanousd(amount_usd)
    except PriceCatalogError as exc:
        raise click.BadParameter(str(exc), param_hint="AMOUNT_USD") from exc
    with _engine(database_url).begin() as conn:
        set_budget(conn, tenant, limit, datetime.now(UTC))
    click.echo(f"{tenant}: monthly budget {format_usd(limit)}")


@budget.command("show")
@click.argument("tenant")
@click.option("--database-url", help="SQLAlchemy URL (default: as for report).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def budget_show(tenant: str, database_url: str | None, as_json: bool) -> None:
    """Prints TENANT's budget and what it has spent this month."""
    with _engine(database_url).connect() as conn:
        status = budget_status(conn, tenant, datetime.now(UTC))
    if as_json:
        found = {
            "tenant": tenant,
            "limit_nanousd": status.limit_nanousd,
            "spent_nanousd": status.spent_nanousd,
            "month_start": status.month_start.isoformat(),
            "exhausted": status.is_exhausted,
        }
        click.echo(json.dumps(found, indent=1))
        return
    limit = "none" if status.limit_nanousd is None else format_usd(status.limit_nanousd)
    click.echo(
        f"{tenant}: spent {format_usd(status.spent_nanousd)} since "
        f"{status.month_start:%Y-%m-%d}; monthly budget {limit}"
    )


@budget.command("remove")
@click.argument("tenant")
@click.option("--database-url", help="SQLAlchemy URL (default: as for report).")
def budget_remove(tenant: str, database_url: str | None) -> None:
    """Removes TENANT's limit."""
    with _engine(database_url).begin() as conn:
        removed = remove_budget(conn, tenant)
    click.echo(f"{tenant}: {'budget removed' if removed else 'had no budget'}")


def _engine(database_url: str | None) -> sa.Engine:
    url = _database_url(database_url)
    if _missing_sqlite_file(url):
        raise click.ClickException(
            f"no database at {url}; run `python -m gpubroker.billing migrate` first"
        )
    return sa.create_engine(url)


if __name__ == "__main__":
    cli()

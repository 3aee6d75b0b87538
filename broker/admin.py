"""``python -m gpubroker.broker.admin``: tenants and their API keys in the broker's database.

A new key is printed once, alone on stdout (so ``KEY=$(python -m gpubroker.broker.admin key create
t)`` works), and never again: only its hash is stored. A running broker picks up every change here
within its key refresh interval (seconds), without a restart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import sqlalchemy as sa

from gpubroker.broker.access.roles import Role
from gpubroker.broker.access.tenants import (
    ApiKey,
    NewKey,
    Tenant,
    TenantError,
    create_key,
    create_tenant,
    disable_tenant,
    enable_tenant,
    list_keys,
    list_tenants,
    revoke_key,
    rotate_key,
)
from gpubroker.broker.config import Settings

__all__ = ["cli"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


def _database_option(command: _F) -> _F:
    return click.option(
        "--database-url",
        envvar="GPUBROKER_DATABASE_URL",
        default=Settings().database_url,
        show_default=True,
        help="SQLAlchemy URL of the broker's database ($GPUBROKER_DATABASE_URL).",
    )(command)


def _run(database_url: str, change: Callable[[sa.Connection, datetime], _T]) -> _T:
    """Runs ``change`` in one transaction; domain and connection errors exit non-zero."""
    url = sa.engine.make_url(database_url)
    shown = url.render_as_string(hide_password=True)
    if _is_missing_sqlite_file(url):
        raise click.ClickException(f"no database at {shown}; has the broker run yet?")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            if not sa.inspect(conn).has_table("api_keys"):
                raise click.ClickException(
                    f"{shown} has no api_keys table: run `python -m gpubroker.billing migrate` "
                    "first"
                )
            return change(conn, datetime.now(UTC))
    except TenantError as exc:
        raise click.ClickException(str(exc)) from exc
    except sa.exc.OperationalError as exc:
        raise click.ClickException(f"cannot use {shown}: {exc.orig}") from exc
    finally:
        engine.dispose()


def _is_missing_sqlite_file(url: sa.URL) -> bool:
    """True for a SQLite file that does not exist (connecting would create an empty one)."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return False
    return not Path(database).exists()


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _show_new_key(new: NewKey, verb: str) -> None:
    info = new.info
    role = " (operator)" if info.role is Role.OPERATOR else ""
    click.echo(f"{verb} key {info.key_id} for tenant {info.tenant}{role}:", err=True)
    click.echo(new.key)
    click.echo("This is the only time the key is shown: store it now.", err=True)


@click.group()
def cli() -> None:
    """Tenants and API keys of the GPU broker."""


@cli.group()
def tenant() -> None:
    """Create, list, disable and enable tenants."""


@tenant.command("create")
@click.argument("name")
@_database_option
def tenant_create(name: str, database_url: str) -> None:
    """Adds tenant NAME."""
    made = _run(database_url, lambda conn, now: create_tenant(conn, name, now))
    click.echo(f"created tenant {made.name}")


_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout, one list.")


def _echo_json(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> None:
    """Rows as a JSON list of objects keyed by the table's lowercased column names."""
    keys = [h.split(" ")[0].lower() for h in header]
    objects = [{k: _value(v) for k, v in zip(keys, row, strict=True)} for row in rows]
    click.echo(json.dumps(objects, indent=1))


def _value(cell: str) -> str | None:
    """A table cell as JSON: the "-" or "" the table shows for nothing is null."""
    return None if cell in ("", "-") else cell


@tenant.command("list")
@_database_option
@_JSON
def tenant_list(database_url: str, as_json: bool) -> None:
    """Lists every tenant."""
    found = _run(database_url, lambda conn, now: list_tenants(conn))
    header = ("TENANT", "CREATED (UTC)", "DISABLED (UTC)")
    rows = map(_tenant_row, found)
    if as_json:
        _echo_json(header, rows)
    else:
        click.echo(_table(header, rows))


def _tenant_row(tenant: Tenant) -> tuple[str, ...]:
    return (tenant.name, _when(tenant.created_at), _when(tenant.disabled_at))


@tenant.command("disable")
@click.argument("name")
@_database_option
def tenant_disable(name: str, database_url: str) -> None:
    """Disables tenant NAME: all its keys are refused and it gets no new ones."""
    done = _run(database_url, lambda conn, now: disable_tenant(conn, name, now))
    click.echo(f"tenant {done.name} disabled since {_when(done.disabled_at)} UTC")


@tenant.command("enable")
@click.argument("name")
@_database_option
def tenant_enable(name: str, database_url: str) -> None:
    """Enables tenant NAME again; its keys that were not revoked work again."""
    _run(database_url, lambda conn, now: enable_tenant(conn, name))
    click.echo(f"tenant {name} enabled")


@cli.group()
def key() -> None:
    """Create, list, revoke and rotate API keys."""


@key.command("create")
@click.argument("tenant")
@click.option("--label", help="A note to tell keys apart, e.g. where the key is used.")
@click.option(
    "--operator",
    is_flag=True,
    help="An operator key: it also sees the whole broker's status (every tenant's queue, the "
    "agents, machines and spend), not only its tenant's share.",
)
@_database_option
def key_create(tenant: str, label: str | None, operator: bool, database_url: str) -> None:
    """Makes a key for TENANT and prints it, once."""
    role = Role.OPERATOR if operator else Role.TENANT
    new = _run(database_url, lambda conn, now: create_key(conn, tenant, now, label, role))
    _show_new_key(new, "created")


@key.command("list")
@click.argument("tenant", required=False)
@_database_option
@_JSON
def key_list(tenant: str | None, database_url: str, as_json: bool) -> None:
    """Lists the keys (of TENANT, or all): ids and dates, never secrets."""
    now = datetime.now(UTC)
    found = _run(database_url, lambda conn, _: list_keys(conn, tenant))
    header = ("KEY_ID", "TENANT", "STATE", "CREATED (UTC)", "REVOKED (UTC)", "LABEL", "ROLE")
    rows = (_key_row(k, now) for k in found)
    if as_json:
        _echo_json(header, rows)
    else:
        click.echo(_table(header, rows))


def _key_row(key: ApiKey, now: datetime) -> tuple[str, ...]:
    state = "active"
    if key.revoked_at is not None:
        state = "revoked" if key.is_revoked(now) else "expiring"
    return (
        key.key_id,
        key.tenant,
        state,
        _when(key.created_at),
        _when(key.revoked_at),
        key.label or "",
        key.role.value,
    )


@key.command("revoke")
@click.argument("key_id")
@_database_option
def key_revoke(key_id: str, database_url: str) -> None:
    """Revokes key KEY_ID now; a running broker refuses it within seconds."""
    done = _run(database_url, lambda conn, now: revoke_key(conn, key_id, now))
    click.echo(f"revoked key {done.key_id} of tenant {done.tenant}")


@key.command("rotate")
@click.argument("key_id")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Seconds the old key keeps working, to give clients time to switch.",
)
@_database_option
def key_rotate(key_id: str, grace: float, database_url: str) -> None:
    """Replaces key KEY_ID with a new key (printed once) for the same tenant."""
    period = timedelta(seconds=grace)
    new = _run(database_url, lambda conn, now: rotate_key(conn, key_id, now, period))
    _show_new_key(new, f"replaced {key_id} with")
    ends = f"in {grace:g} s" if grace else "now"
    click.echo(f"Key {key_id} stops working {ends}.", err=True)


if __name__ == "__main__":
    cli()

"""Tenants and hashed API keys in the database, and the ``python -m gpubroker.broker.admin`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from gpubroker.billing.models import metadata
from gpubroker.broker.access.tenants import (
    InvalidTenantNameError,
    KeyNotFoundError,
    KeyRevokedError,
    TenantDisabledError,
    TenantExistsError,
    TenantNotFoundError,
    create_key,
    create_tenant,
    disable_tenant,
    enable_tenant,
    hash_secret,
    list_keys,
    list_tenants,
    load_keys,
    parse_key,
    revoke_key,
    rotate_key,
)
from gpubroker.broker.admin import cli
from tests.support.paths import REPO_ROOT

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _dump(engine: sa.Engine) -> str:
    """Every row of every table, as text."""
    with engine.connect() as conn:
        return "\n".join(
            repr(row) for table in metadata.sorted_tables for row in conn.execute(table.select())
        )


# ---------------------------------------------------------------------------------------------
# Key format and hashing
# ---------------------------------------------------------------------------------------------


def test_a_key_parses_into_its_id_and_secret_even_when_the_secret_has_underscores() -> None:
    assert parse_key("gpb_Ab3dE5g7_x_y-z") == ("Ab3dE5g7", "x_y-z")


@pytest.mark.parametrize(
    "text", ["", "gpb", "gpb_Ab3dE5g7", "gpb_Ab3dE5g7_", "xyz_Ab3dE5g7_secret", "gpb_short_s"]
)
def test_anything_else_is_not_a_key(text: str) -> None:
    assert parse_key(text) is None


def test_a_created_key_has_the_documented_shape(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "acme", NOW)
        new = create_key(conn, "acme", NOW, label="laptop")

    parsed = parse_key(new.key)

    assert parsed is not None
    key_id, secret = parsed
    assert key_id == new.info.key_id
    assert len(secret) >= 43  # 32 random bytes, URL-safe base64
    assert new.key not in repr(new)


def test_the_database_holds_the_hash_of_the_secret_and_never_the_key(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "acme", NOW)
        new = create_key(conn, "acme", NOW)
        rotated = rotate_key(conn, new.info.key_id, NOW)
    secrets_made = [parse_key(k.key)[1] for k in (new, rotated)]  # type: ignore[index]

    dump = _dump(engine)
    with engine.connect() as conn:
        stored = load_keys(conn)

    for made, secret in zip((new, rotated), secrets_made, strict=True):
        assert made.key not in dump
        assert secret not in dump
        assert stored[made.info.key_id].secret_sha256 == hash_secret(secret)


def test_a_sqlite_file_contains_no_secret_bytes(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    with engine.begin() as conn:
        create_tenant(conn, "acme", NOW)
        new = create_key(conn, "acme", NOW)
    engine.dispose()

    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())

    _, secret = parse_key(new.key)  # type: ignore[misc]
    assert secret.encode() not in raw
    assert new.info.key_id.encode() in raw


# ---------------------------------------------------------------------------------------------
# Tenants and keys on SQLite and PostgreSQL
# ---------------------------------------------------------------------------------------------


def test_tenants_are_created_once_and_listed_by_name(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "zeta", NOW)
        create_tenant(conn, "alpha", NOW)

    with engine.begin() as conn, pytest.raises(TenantExistsError):
        create_tenant(conn, "alpha", NOW)
    with engine.connect() as conn:
        names = [t.name for t in list_tenants(conn)]

    assert names == ["alpha", "zeta"]


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "caf\u00e9"])
def test_odd_tenant_names_are_refused(engine: sa.Engine, name: str) -> None:
    with engine.begin() as conn, pytest.raises(InvalidTenantNameError):
        create_tenant(conn, name, NOW)


def test_keys_are_listed_per_tenant_without_secrets(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "a", NOW)
        create_tenant(conn, "b", NOW)
        first = create_key(conn, "a", NOW, label="ci")
        second = create_key(conn, "a", NOW + timedelta(seconds=1))
        other = create_key(conn, "b", NOW)

    with engine.connect() as conn:
        of_a = list_keys(conn, "a")
        every = list_keys(conn)

    assert [k.key_id for k in of_a] == [first.info.key_id, second.info.key_id]
    assert of_a[0].label == "ci"
    assert of_a[0].created_at == NOW
    assert {k.key_id for k in every} == {first.info.key_id, second.info.key_id, other.info.key_id}
    assert not hasattr(of_a[0], "secret_sha256")


def test_keys_of_an_unknown_tenant_are_an_error(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        with pytest.raises(TenantNotFoundError):
            create_key(conn, "nobody", NOW)
        with pytest.raises(TenantNotFoundError):
            list_keys(conn, "nobody")


def test_a_revoked_key_is_marked_and_cannot_be_revoked_again(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "a", NOW)
        key_id = create_key(conn, "a", NOW).info.key_id

    with engine.begin() as conn:
        revoked = revoke_key(conn, key_id, NOW + timedelta(minutes=1))
    with engine.begin() as conn, pytest.raises(KeyRevokedError):
        revoke_key(conn, key_id, NOW + timedelta(minutes=2))
    with engine.begin() as conn, pytest.raises(KeyNotFoundError):
        revoke_key(conn, "Nope1234", NOW)
    with engine.connect() as conn:
        stored = load_keys(conn)[key_id]

    assert revoked.revoked_at == NOW + timedelta(minutes=1)
    assert stored.revoked_at == NOW + timedelta(minutes=1)


def test_rotating_makes_a_new_key_and_ends_the_old_one_after_the_grace(
    engine: sa.Engine,
) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "a", NOW)
        old = create_key(conn, "a", NOW, label="svc").info

    with engine.begin() as conn:
        new = rotate_key(conn, old.key_id, NOW, grace=timedelta(minutes=5))
    with engine.connect() as conn:
        keys = {k.key_id: k for k in list_keys(conn, "a")}

    assert new.info.key_id != old.key_id
    assert new.info.tenant == "a"
    assert new.info.label == "svc"
    assert keys[old.key_id].revoked_at == NOW + timedelta(minutes=5)
    assert not keys[old.key_id].is_revoked(NOW + timedelta(minutes=4))
    assert keys[old.key_id].is_revoked(NOW + timedelta(minutes=5))
    assert keys[new.info.key_id].revoked_at is None


def test_a_key_in_its_grace_period_can_still_be_revoked_at_once(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "a", NOW)
        old = create_key(conn, "a", NOW).info
        rotate_key(conn, old.key_id, NOW, grace=timedelta(hours=1))

    with engine.begin() as conn:
        revoked = revoke_key(conn, old.key_id, NOW + timedelta(minutes=1))

    assert revoked.revoked_at == NOW + timedelta(minutes=1)


def test_a_revoked_key_cannot_be_rotated(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "a", NOW)
        key_id = create_key(conn, "a", NOW).info.key_id
        revoke_key(conn, key_id, NOW)

    with engine.begin() as conn, pytest.raises(KeyRevokedError):
        rotate_key(conn, key_id, NOW + timedelta(seconds=1))


def test_a_disabled_tenant_gets_no_keys_and_its_keys_show_it(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "a", NOW)
        key_id = create_key(conn, "a", NOW).info.key_id

    with engine.begin() as conn:
        disabled = disable_tenant(conn, "a", NOW)
        again = disable_tenant(conn, "a", NOW + timedelta(hours=1))
    with engine.begin() as conn, pytest.raises(TenantDisabledError):
        create_key(conn, "a", NOW)
    with engine.connect() as conn:
        stored = load_keys(conn)[key_id]
    with engine.begin() as conn:
        enable_tenant(conn, "a")
        reenabled = load_keys(conn)[key_id]

    assert disabled.disabled_at == again.disabled_at == NOW
    assert stored.tenant_disabled_at == NOW
    assert reenabled.tenant_disabled_at is None


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def _admin(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--database-url", url])


def test_the_cli_creates_a_tenant_and_a_key_shown_once(db: str) -> None:
    created = _admin(db, "tenant", "create", "acme")
    key = _admin(db, "key", "create", "acme", "--label", "laptop")
    listed = _admin(db, "key", "list", "acme")

    assert created.exit_code == 0, created.output
    assert key.exit_code == 0, key.output
    plaintext = key.stdout.strip()
    parsed = parse_key(plaintext)
    assert parsed is not None
    assert "only time" in key.stderr
    assert listed.exit_code == 0, listed.output
    assert parsed[0] in listed.output
    assert "laptop" in listed.output
    assert "active" in listed.output
    assert parsed[1] not in listed.output


def test_the_cli_lists_and_disables_tenants(db: str) -> None:
    _admin(db, "tenant", "create", "acme")

    disabled = _admin(db, "tenant", "disable", "acme")
    listed = _admin(db, "tenant", "list")

    assert disabled.exit_code == 0, disabled.output
    row = next(line for line in listed.output.splitlines() if line.startswith("acme"))
    assert row.count("-") >= 4  # two dates: created and disabled


def test_the_cli_lists_tenants_and_keys_as_json(db: str) -> None:
    _admin(db, "tenant", "create", "acme")
    made = parse_key(_admin(db, "key", "create", "acme", "--label", "ci").stdout.strip())
    assert made is not None

    tenants = json.loads(_admin(db, "tenant", "list", "--json").stdout)
    keys = json.loads(_admin(db, "key", "list", "--json").stdout)

    assert [(t["tenant"], t["disabled"]) for t in tenants] == [("acme", None)]
    assert [(k["key_id"], k["tenant"], k["state"], k["label"], k["role"]) for k in keys] == [
        (made[0], "acme", "active", "ci", "tenant")
    ]
    assert made[1] not in json.dumps(keys)


def test_the_cli_revokes_and_rotates_keys(db: str) -> None:
    _admin(db, "tenant", "create", "acme")
    old = parse_key(_admin(db, "key", "create", "acme").stdout.strip())
    assert old is not None

    rotated = _admin(db, "key", "rotate", old[0], "--grace", "60")
    new = parse_key(rotated.stdout.strip())
    assert new is not None
    revoked = _admin(db, "key", "revoke", new[0])
    listed = _admin(db, "key", "list")

    assert rotated.exit_code == 0, rotated.output
    assert revoked.exit_code == 0, revoked.output
    states = {line.split()[0]: line.split()[2] for line in listed.output.splitlines()[1:]}
    assert states == {old[0]: "expiring", new[0]: "revoked"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("key", "create", "nobody"), "no tenant 'nobody'"),
        (("key", "list", "nobody"), "no tenant 'nobody'"),
        (("key", "revoke", "Nope1234"), "no API key with id 'Nope1234'"),
        (("key", "rotate", "Nope1234"), "no API key with id 'Nope1234'"),
        (("tenant", "disable", "nobody"), "no tenant 'nobody'"),
        (("tenant", "create", "bad name"), "tenant name 'bad name'"),
    ],
)
def test_the_cli_fails_clearly(db: str, args: tuple[str, ...], message: str) -> None:
    result = _admin(db, *args)

    assert result.exit_code == 1
    assert message in result.output


def test_the_cli_refuses_a_revoked_key_and_a_duplicate_tenant(db: str) -> None:
    _admin(db, "tenant", "create", "acme")
    key_id = parse_key(_admin(db, "key", "create", "acme").stdout.strip())[0]  # type: ignore[index]
    _admin(db, "key", "revoke", key_id)

    again = _admin(db, "key", "revoke", key_id)
    rotate = _admin(db, "key", "rotate", key_id)
    duplicate = _admin(db, "tenant", "create", "acme")

    assert (again.exit_code, rotate.exit_code, duplicate.exit_code) == (1, 1, 1)
    assert "was revoked" in again.output
    assert "was revoked" in rotate.output
    assert "already exists" in duplicate.output


def test_the_cli_explains_a_missing_or_unmigrated_database(tmp_path: Path) -> None:
    missing = _admin(f"sqlite:///{tmp_path / 'none.db'}", "tenant", "list")
    empty_url = f"sqlite:///{tmp_path / 'empty.db'}"
    empty = sa.create_engine(empty_url)
    empty.connect().close()
    empty.dispose()
    unmigrated = _admin(empty_url, "tenant", "list")

    assert missing.exit_code == 1
    assert "no database" in missing.output
    assert unmigrated.exit_code == 1
    assert "python -m gpubroker.billing migrate" in unmigrated.output


@pytest.mark.slow  # two python -m processes
def test_python_m_broker_admin_reads_the_database_url_from_the_environment(db: str) -> None:
    env = {**os.environ, "GPUBROKER_DATABASE_URL": db}
    run = [sys.executable, "-m", "gpubroker.broker.admin"]

    created = subprocess.run(
        [*run, "tenant", "create", "acme"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    listed = subprocess.run(
        [*run, "tenant", "list"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )

    assert created.returncode == 0, created.stderr
    assert "acme" in listed.stdout

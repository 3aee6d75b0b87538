"""Key roles: operator keys from the admin CLI and from the settings, and migration 0012 on
SQLite and PostgreSQL (the role column and the task_attempts table)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from gpubroker.billing.migrate import current_revision, downgrade, upgrade
from gpubroker.billing.models import api_keys, task_attempts, tenants
from gpubroker.broker.access.auth import Authenticator, database_keys
from gpubroker.broker.access.roles import Caller, Role
from gpubroker.broker.access.tenants import create_key, create_tenant, list_keys, rotate_key
from gpubroker.broker.admin import cli
from gpubroker.broker.config import parse_api_keys
from gpubroker.broker.errors import UnauthenticatedError
from tests.support.rpc import bearer

NOW = datetime(2027, 1, 5, 12, 0, tzinfo=UTC)


def _admin(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, [*args, "--database-url", url])


async def test_the_cli_makes_an_operator_key_the_broker_accepts_as_one(db: str) -> None:
    _admin(db, "tenant", "create", "ops")
    made = _admin(db, "key", "create", "ops", "--operator")
    plain = _admin(db, "key", "create", "ops")
    listed = _admin(db, "key", "list")
    engine = sa.create_engine(db)
    auth = Authenticator({}, None, database_keys(engine))
    await auth.refresh()

    operator = auth.caller(bearer(made.stdout.strip()))
    tenant = auth.caller(bearer(plain.stdout.strip()))
    engine.dispose()

    assert made.exit_code == 0, made.output
    assert "(operator)" in made.stderr
    assert (operator, tenant) == (Caller("ops", Role.OPERATOR), Caller("ops", Role.TENANT))
    roles = sorted(line.split()[-1] for line in listed.output.splitlines()[1:])
    assert roles == ["operator", "tenant"]


def test_a_rotated_key_keeps_its_role(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "ops", NOW)
        old = create_key(conn, "ops", NOW, role=Role.OPERATOR)
        new = rotate_key(conn, old.info.key_id, NOW)
        keys = {k.key_id: k.role for k in list_keys(conn)}

    assert new.info.role is Role.OPERATOR
    assert keys == {old.info.key_id: Role.OPERATOR, new.info.key_id: Role.OPERATOR}


def test_settings_keys_name_an_operator_with_a_role_suffix() -> None:
    keys = parse_api_keys("k1=acme,k2=ops:operator,k3=team:tenant")
    auth = Authenticator(keys, None)

    assert auth.caller(bearer("k1")) == Caller("acme", Role.TENANT)
    assert auth.caller(bearer("k2")) == Caller("ops", Role.OPERATOR)
    assert auth.caller(bearer("k3")) == Caller("team", Role.TENANT)
    assert auth.tenant(bearer("k2")) == "ops"
    with pytest.raises(UnauthenticatedError):
        auth.caller(bearer("k4"))


@pytest.mark.parametrize("text", ["k=ops:admin", "k=:operator", "k="])
def test_a_bad_role_or_tenant_in_the_settings_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="API key entry"):
        parse_api_keys(text)


def test_an_open_broker_treats_its_one_caller_as_an_operator() -> None:
    assert Authenticator({}, None).caller(None) == Caller("default", Role.OPERATOR)


def test_migration_0012_gives_old_keys_the_tenant_role_and_adds_task_attempts(
    empty_engine: sa.Engine,
) -> None:
    upgrade(empty_engine, "0011")
    with empty_engine.begin() as conn:  # only the columns 0011 has
        conn.execute(sa.insert(tenants).values(name="acme", created_at=NOW))
        conn.execute(
            sa.insert(api_keys).values(
                key_id="Ab3dE5g7", tenant="acme", secret_sha256="0" * 64, created_at=NOW
            )
        )

    upgrade(empty_engine, "0012")
    with empty_engine.begin() as conn:
        role = conn.execute(sa.select(api_keys.c.role)).scalar_one()
        conn.execute(
            sa.insert(task_attempts).values(
                task_id="t1", attempt=1, agent_id="a1", gpu_type="cpu", started_at=NOW
            )
        )
        attempt = conn.execute(sa.select(task_attempts)).one()
    downgrade(empty_engine, "0011")

    assert role == "tenant"
    assert (attempt.agent_id, attempt.started_at, attempt.ended_at) == ("a1", NOW, None)
    inspector = sa.inspect(empty_engine)
    assert "role" not in {c["name"] for c in inspector.get_columns("api_keys")}
    assert not inspector.has_table("task_attempts")
    assert current_revision(empty_engine) == "0011"

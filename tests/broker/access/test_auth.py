"""API keys from the database: the Authenticator's cache, and end to end through the broker."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from gpubroker.billing.migrate import upgrade
from gpubroker.broker.access.auth import DEFAULT_TENANT, REFRESH_INTERVAL_S, Authenticator
from gpubroker.broker.access.tenants import (
    StoredKey,
    create_key,
    create_tenant,
    disable_tenant,
    hash_secret,
    revoke_key,
)
from gpubroker.broker.errors import UnauthenticatedError
from gpubroker.protos import agent_pb2, agent_pb2_grpc, broker_pb2, broker_pb2_grpc
from tests.support.rpc import bearer, status_code, submit
from tests.support.waiting import wait_for, wait_for_async

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
KEY_ID = "Ab3dE5g7"
SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret-s3cret-x"
KEY = f"gpb_{KEY_ID}_{SECRET}"
PAYLOAD = b"payload"


def _stored(
    tenant: str = "acme",
    revoked_at: datetime | None = None,
    disabled_at: datetime | None = None,
) -> dict[str, StoredKey]:
    return {KEY_ID: StoredKey(tenant, hash_secret(SECRET), revoked_at, disabled_at)}


@dataclass
class FakeKeyTable:
    """A loader over a dict the test changes; counts reads."""

    keys: Mapping[str, StoredKey]
    reads: int = 0
    fail: bool = False

    def __call__(self) -> Mapping[str, StoredKey]:
        self.reads += 1
        if self.fail:
            raise sa.exc.OperationalError("SELECT", {}, Exception("database is down"))
        return dict(self.keys)


def _refuses(auth: Authenticator, key: str) -> bool:
    """Whether ``auth`` refuses ``key`` now."""
    try:
        auth.tenant(bearer(key))
    except UnauthenticatedError:
        return True
    return False


async def _loaded(table: FakeKeyTable, **kwargs: float) -> Authenticator:
    auth = Authenticator({}, None, table, clock=lambda: NOW, **kwargs)
    await auth.refresh()
    return auth


# ---------------------------------------------------------------------------------------------
# The Authenticator over a fake key table
# ---------------------------------------------------------------------------------------------


async def test_a_stored_key_maps_to_its_tenant() -> None:
    auth = await _loaded(FakeKeyTable(_stored()))

    assert not auth.is_open
    assert auth.tenant(bearer(KEY)) == "acme"


@pytest.mark.parametrize(
    "key",
    [f"gpb_{KEY_ID}_wrong", f"gpb_Zz9yY8xX_{SECRET}", "gpb_nonsense", SECRET, KEY_ID],
)
async def test_a_wrong_or_malformed_key_is_refused(key: str) -> None:
    auth = await _loaded(FakeKeyTable(_stored()))

    with pytest.raises(UnauthenticatedError, match="invalid API key"):
        auth.tenant(bearer(key))


async def test_a_missing_key_is_refused() -> None:
    auth = await _loaded(FakeKeyTable(_stored()))

    with pytest.raises(UnauthenticatedError, match="missing API key"):
        auth.tenant(())


async def test_a_revoked_key_is_refused_and_one_in_its_grace_period_is_not() -> None:
    revoked = await _loaded(FakeKeyTable(_stored(revoked_at=NOW)))
    in_grace = await _loaded(FakeKeyTable(_stored(revoked_at=NOW + timedelta(seconds=1))))

    with pytest.raises(UnauthenticatedError, match="revoked"):
        revoked.tenant(bearer(KEY))
    assert in_grace.tenant(bearer(KEY)) == "acme"


async def test_a_disabled_tenants_key_is_refused() -> None:
    auth = await _loaded(FakeKeyTable(_stored(disabled_at=NOW)))

    with pytest.raises(UnauthenticatedError, match="disabled"):
        auth.tenant(bearer(KEY))


async def test_settings_keys_and_stored_keys_both_work() -> None:
    auth = Authenticator({"dev-key": "dev"}, None, FakeKeyTable(_stored()))
    await auth.refresh()

    assert auth.tenant(bearer("dev-key")) == "dev"
    assert auth.tenant(bearer(KEY)) == "acme"


def test_settings_keys_work_without_a_database() -> None:
    auth = Authenticator({"dev-key": "dev"}, None)

    assert auth.tenant(bearer("dev-key")) == "dev"
    with pytest.raises(UnauthenticatedError):
        auth.tenant(bearer("other"))


async def test_open_mode_needs_no_key_anywhere_and_revoked_rows_close_it() -> None:
    empty = await _loaded(FakeKeyTable({}))
    only_revoked = await _loaded(FakeKeyTable(_stored(revoked_at=NOW - timedelta(days=1))))

    assert empty.is_open
    assert empty.tenant(()) == DEFAULT_TENANT
    assert not only_revoked.is_open
    with pytest.raises(UnauthenticatedError):
        only_revoked.tenant(())


async def test_the_background_reload_applies_a_revocation_within_the_interval() -> None:
    table = FakeKeyTable(_stored())
    auth = await _loaded(table, refresh_interval_s=0.2)
    auth.start()
    try:
        assert auth.tenant(bearer(KEY)) == "acme"

        table.keys = _stored(revoked_at=NOW)
        await wait_for(lambda: _refuses(auth, KEY), 1.0, "the revocation to be loaded")

        with pytest.raises(UnauthenticatedError, match="revoked"):
            auth.tenant(bearer(KEY))
    finally:
        await auth.stop()


async def test_an_unknown_key_id_triggers_an_early_reload_but_not_a_flood() -> None:
    table = FakeKeyTable({"Other123": _stored()[KEY_ID]})
    auth = await _loaded(table, refresh_interval_s=2.0)
    auth.start()
    try:
        table.keys = {**table.keys, **_stored()}
        for _ in range(100):
            with pytest.raises(UnauthenticatedError):
                auth.tenant(bearer(KEY))

        # One early reload, a quarter interval (0.5 s) after the first miss; well short of 2 s.
        await wait_for(lambda: not _refuses(auth, KEY), 1.5, "the early reload")

        assert auth.tenant(bearer(KEY)) == "acme"
        assert table.reads == 2
    finally:
        await auth.stop()


async def test_a_failed_reload_keeps_the_last_keys(caplog: pytest.LogCaptureFixture) -> None:
    table = FakeKeyTable(_stored())
    auth = await _loaded(table, refresh_interval_s=0.1)
    table.fail = True
    auth.start()
    try:
        await wait_for(lambda: "API key reload failed" in caplog.text, 5.0, "a failed reload")

        assert table.reads > 1
        assert auth.tenant(bearer(KEY)) == "acme"
        assert "API key reload failed" in caplog.text
    finally:
        await auth.stop()


def test_the_join_token_is_still_checked() -> None:
    auth = Authenticator({}, "join-me")

    auth.check_agent(bearer("join-me"))
    with pytest.raises(UnauthenticatedError):
        auth.check_agent(bearer(KEY))


# ---------------------------------------------------------------------------------------------
# End to end: keys made in the database, a broker in this process
# ---------------------------------------------------------------------------------------------


@dataclass
class Keys:
    """Keys made in the broker's database before it started."""

    url: str
    a: str
    a_id: str
    b: str


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    engine = sa.create_engine(url)
    upgrade(engine)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        create_tenant(conn, "tenant-a", now)
        create_tenant(conn, "tenant-b", now)
        a = create_key(conn, "tenant-a", now)
        b = create_key(conn, "tenant-b", now)
    engine.dispose()
    return Keys(url, a.key, a.info.key_id, b.key)


@pytest.fixture
def broker_overrides(keys: Keys) -> dict[str, object]:
    """The broker reads the keys made in its database, beside one settings key."""
    return {"database_url": keys.url, "api_keys": {"dev-key": "dev"}, "join_token": "join-me"}


async def _list(broker_channel: grpc.aio.Channel, key: str) -> set[str]:
    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    reply = await stub.ListTasks(broker_pb2.ListTasksRequest(), metadata=bearer(key))
    return {task.task_id for task in reply.tasks}


async def test_a_key_made_with_the_admin_functions_works(
    broker_channel: grpc.aio.Channel, keys: Keys
) -> None:
    task_id = await submit(broker_channel, PAYLOAD, keys.a)

    assert task_id in await _list(broker_channel, keys.a)


async def test_a_settings_key_still_works_beside_the_database(
    broker_channel: grpc.aio.Channel,
) -> None:
    task_id = await submit(broker_channel, PAYLOAD, "dev-key")

    assert task_id in await _list(broker_channel, "dev-key")


async def _soon(channel: grpc.aio.Channel, key: str, wanted: grpc.StatusCode) -> bool:
    """True once ListTasks with ``key`` ends in ``wanted``, within one refresh interval (+1 s);
    fails the test otherwise."""

    async def ends_as_wanted() -> bool:
        return await status_code(_list(channel, key)) == wanted

    await wait_for_async(ends_as_wanted, REFRESH_INTERVAL_S + 1, f"{wanted.name}", interval=0.1)
    return True


async def test_a_key_made_while_the_broker_runs_works_within_the_refresh_interval(
    broker_channel: grpc.aio.Channel, keys: Keys
) -> None:
    engine = sa.create_engine(keys.url)
    with engine.begin() as conn:
        new = create_key(conn, "tenant-a", datetime.now(UTC))
    engine.dispose()

    assert await _soon(broker_channel, new.key, grpc.StatusCode.OK)


@pytest.mark.slow  # waits out the broker's 2 s key reload
async def test_a_revoked_key_is_refused_within_the_refresh_interval(
    broker_channel: grpc.aio.Channel, keys: Keys
) -> None:
    await _list(broker_channel, keys.a)
    engine = sa.create_engine(keys.url)
    with engine.begin() as conn:
        revoke_key(conn, keys.a_id, datetime.now(UTC))
    engine.dispose()

    assert await _soon(broker_channel, keys.a, grpc.StatusCode.UNAUTHENTICATED)
    assert await _list(broker_channel, keys.b) == set()


@pytest.mark.slow  # waits out the broker's 2 s key reload
async def test_a_disabled_tenant_is_refused_within_the_refresh_interval(
    broker_channel: grpc.aio.Channel, keys: Keys
) -> None:
    engine = sa.create_engine(keys.url)
    with engine.begin() as conn:
        disable_tenant(conn, "tenant-b", datetime.now(UTC))
    engine.dispose()

    assert await _soon(broker_channel, keys.b, grpc.StatusCode.UNAUTHENTICATED)
    assert await _list(broker_channel, keys.a) == set()


async def test_one_tenant_cannot_see_or_touch_anothers_task(
    broker_channel: grpc.aio.Channel, keys: Keys
) -> None:
    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    theirs = await submit(broker_channel, PAYLOAD, keys.b)
    as_a = bearer(keys.a)

    codes = [
        await status_code(stub.GetTask(broker_pb2.GetTaskRequest(task_id=theirs), metadata=as_a)),
        await status_code(
            stub.WatchTask(broker_pb2.WatchTaskRequest(task_id=theirs), metadata=as_a)
        ),
        await status_code(
            stub.GetResult(broker_pb2.GetResultRequest(task_id=theirs), metadata=as_a)
        ),
        await status_code(
            stub.CancelTask(broker_pb2.CancelTaskRequest(task_id=theirs), metadata=as_a)
        ),
    ]

    assert codes == [grpc.StatusCode.NOT_FOUND] * 4
    assert await _list(broker_channel, keys.a) == set()
    assert await _list(broker_channel, keys.b) == {theirs}


async def test_a_tenant_key_is_refused_on_every_agent_rpc(
    broker_channel: grpc.aio.Channel, keys: Keys
) -> None:
    stub = agent_pb2_grpc.AgentGatewayStub(broker_channel)
    attempt = agent_pb2.TaskAttempt(task_id="t", attempt=1)

    for key in (keys.a, "dev-key"):
        # The streams send nothing: the key is checked before any message is read, and a
        # grpcio aio client whose write races the server's early status reports INTERNAL
        # instead of that status (grpc/grpc#36066). With a valid key these calls would fail
        # differently (no hello; no header), so only the key check can answer UNAUTHENTICATED.
        connect = stub.Connect(iter([]), metadata=bearer(key))
        fetch = stub.FetchInputs(
            agent_pb2.FetchInputsRequest(agent_id="x", attempt=attempt), metadata=bearer(key)
        )
        put = stub.PutResult(iter([]), metadata=bearer(key))

        assert await status_code(connect) == grpc.StatusCode.UNAUTHENTICATED
        assert await status_code(fetch) == grpc.StatusCode.UNAUTHENTICATED
        assert await status_code(put) == grpc.StatusCode.UNAUTHENTICATED


async def test_the_join_token_is_refused_on_the_broker_service(
    broker_channel: grpc.aio.Channel,
) -> None:
    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    as_agent = bearer("join-me")

    list_code = await status_code(stub.ListTasks(broker_pb2.ListTasksRequest(), metadata=as_agent))
    get_code = await status_code(
        stub.GetTask(broker_pb2.GetTaskRequest(task_id="t"), metadata=as_agent)
    )
    submit_code = await status_code(submit(broker_channel, PAYLOAD, "join-me"))

    assert [list_code, get_code, submit_code] == [grpc.StatusCode.UNAUTHENTICATED] * 3

"""Tenants and their API keys in the database: create, list, rotate, revoke, disable.

A key reads ``gpb_<key_id>_<secret>``. ``key_id`` (8 letters and digits) names the key in lists
and logs; ``secret`` is 32 random bytes from ``secrets``, URL-safe base64. Only the key id and
the SHA-256 of the secret are stored, never the key. A plain hash is enough here: a slow KDF
(bcrypt, scrypt, argon2) protects low-entropy passwords against guessing, but guessing a
256-bit random secret from its hash is hopeless anyway, and a fast hash keeps the per-call
check (``gpubroker.broker.access.auth``) cheap. Checks compare hashes with ``hmac.compare_digest``.

Every function takes a ``Connection`` and leaves the transaction to the caller
(``with engine.begin() as conn: ...``), and takes the time as ``now``.

TenantError (BrokerError)
├── InvalidTenantNameError   the name is empty, too long or has odd characters
├── TenantExistsError        ``create_tenant`` of a name in use
├── TenantNotFoundError      no such tenant row
├── TenantDisabledError      new keys for a disabled tenant
├── KeyNotFoundError         no key with this id
└── KeyRevokedError          revoking or rotating a key that is already revoked
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gpubroker.billing.models import api_keys, tenants
from gpubroker.broker.access.roles import Role
from gpubroker.broker.errors import BrokerError

__all__ = [
    "KEY_PREFIX",
    "ApiKey",
    "InvalidTenantNameError",
    "KeyNotFoundError",
    "KeyRevokedError",
    "NewKey",
    "StoredKey",
    "Tenant",
    "TenantDisabledError",
    "TenantError",
    "TenantExistsError",
    "TenantNotFoundError",
    "create_key",
    "create_tenant",
    "disable_tenant",
    "enable_tenant",
    "hash_secret",
    "list_keys",
    "list_tenants",
    "load_keys",
    "parse_key",
    "revoke_key",
    "rotate_key",
]

KEY_PREFIX = "gpb"
"""First part of every key, so a leaked key is recognisable (secret scanners, logs)."""

_KEY_ID_LENGTH = 8
_KEY_ID_ALPHABET = string.ascii_letters + string.digits  # no "_": it separates the parts
_SECRET_BYTES = 32
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TenantError(BrokerError):
    """Base class for errors managing tenants and keys."""


class InvalidTenantNameError(TenantError):
    """A tenant name is not 1-64 letters, digits, '.', '_' or '-' (starting alphanumeric)."""


class TenantExistsError(TenantError):
    """A tenant with this name already exists."""


class TenantNotFoundError(TenantError):
    """No tenant has this name."""


class TenantDisabledError(TenantError):
    """The tenant is disabled: it gets no new keys and its keys are refused."""


class KeyNotFoundError(TenantError):
    """No API key has this id."""


class KeyRevokedError(TenantError):
    """The API key is already revoked."""


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant row."""

    name: str
    created_at: datetime
    disabled_at: datetime | None

    @property
    def is_disabled(self) -> bool:
        """True once the tenant was disabled."""
        return self.disabled_at is not None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What may be shown about a key: everything but its secret and hash."""

    key_id: str
    tenant: str
    label: str | None
    created_at: datetime
    revoked_at: datetime | None
    """None while the key is valid; a future time while a rotated key's grace period runs."""
    role: Role = Role.TENANT
    """What the key may see (``access.roles``)."""

    def is_revoked(self, now: datetime) -> bool:
        """True once ``revoked_at`` has passed."""
        return self.revoked_at is not None and self.revoked_at <= now


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just made: the only time its plaintext exists."""

    key: str = field(repr=False)
    """``gpb_<key_id>_<secret>``: show it to the operator once, then forget it."""
    info: ApiKey


@dataclass(frozen=True, slots=True)
class StoredKey:
    """What the broker checks a presented key against (``access.auth`` caches these)."""

    tenant: str
    secret_sha256: str
    """Hex SHA-256 of the key's secret."""
    revoked_at: datetime | None
    tenant_disabled_at: datetime | None
    role: Role = Role.TENANT


def hash_secret(secret: str) -> str:
    """The hex SHA-256 of a key's secret, as stored."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(key: str) -> tuple[str, str] | None:
    """Splits ``gpb_<key_id>_<secret>`` into key id and secret; None for anything else."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or len(key_id) != _KEY_ID_LENGTH or not secret:
        return None
    return key_id, secret


def create_tenant(conn: Connection, name: str, now: datetime) -> Tenant:
    """Adds a tenant; raises ``TenantExistsError`` or ``InvalidTenantNameError``."""
    if not _TENANT_NAME.fullmatch(name):
        raise InvalidTenantNameError(
            f"tenant name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if _tenant_row(conn, name) is not None:
        raise TenantExistsError(f"tenant {name!r} already exists")
    conn.execute(sa.insert(tenants).values(name=name, created_at=now, disabled_at=None))
    return Tenant(name, now, None)


def list_tenants(conn: Connection) -> tuple[Tenant, ...]:
    """Every tenant, by name."""
    rows = conn.execute(sa.select(tenants).order_by(tenants.c.name))
    return tuple(Tenant(row.name, row.created_at, row.disabled_at) for row in rows)


def disable_tenant(conn: Connection, name: str, now: datetime) -> Tenant:
    """Disables a tenant: all its keys stop working. Disabling twice keeps the first time."""
    tenant = _tenant(conn, name)
    if tenant.is_disabled:
        return tenant
    conn.execute(sa.update(tenants).where(tenants.c.name == name).values(disabled_at=now))
    return Tenant(name, tenant.created_at, now)


def enable_tenant(conn: Connection, name: str) -> Tenant:
    """Enables a disabled tenant again; its keys that were not revoked work again."""
    tenant = _tenant(conn, name)
    conn.execute(sa.update(tenants).where(tenants.c.name == name).values(disabled_at=None))
    return Tenant(name, tenant.created_at, None)


def create_key(
    conn: Connection,
    tenant: str,
    now: datetime,
    label: str | None = None,
    role: Role = Role.TENANT,
) -> NewKey:
    """Makes a key for an enabled tenant; the result holds the only copy of the plaintext."""
    if _tenant(conn, tenant).is_disabled:
        raise TenantDisabledError(f"tenant {tenant!r} is disabled")
    key_id = _unused_key_id(conn)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    conn.execute(
        sa.insert(api_keys).values(
            key_id=key_id,
            tenant=tenant,
            secret_sha256=hash_secret(secret),
            label=label,
            created_at=now,
            revoked_at=None,
            role=role.value,
        )
    )
    info = ApiKey(key_id, tenant, label, now, None, role)
    return NewKey(f"{KEY_PREFIX}_{key_id}_{secret}", info)


def list_keys(conn: Connection, tenant: str | None = None) -> tuple[ApiKey, ...]:
    """Keys (of one tenant, or all), oldest first; never their secrets."""
    query = sa.select(*_INFO_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.key_id)
    if tenant is not None:
        _tenant(conn, tenant)
        query = query.where(api_keys.c.tenant == tenant)
    return tuple(_api_key(row) for row in conn.execute(query))


def revoke_key(conn: Connection, key_id: str, now: datetime) -> ApiKey:
    """Revokes a key now (also one whose rotation grace is still running)."""
    key = _live_key(conn, key_id, now)
    _set_revoked_at(conn, key_id, now)
    return dataclasses.replace(key, revoked_at=now)


def rotate_key(
    conn: Connection, key_id: str, now: datetime, grace: timedelta = timedelta(0)
) -> NewKey:
    """Makes a new key for the same tenant, label and role; the old one stops after ``grace``."""
    if grace < timedelta(0):
        raise ValueError(f"a grace period cannot be negative ({grace})")
    old = _live_key(conn, key_id, now)
    new = create_key(conn, old.tenant, now, old.label, old.role)
    ends = now + grace
    if old.revoked_at is None or ends < old.revoked_at:
        _set_revoked_at(conn, key_id, ends)
    return new


def load_keys(conn: Connection) -> dict[str, StoredKey]:
    """Every key, revoked ones included, by key id: what the broker's cache holds."""
    query = sa.select(
        api_keys.c.key_id,
        api_keys.c.tenant,
        api_keys.c.secret_sha256,
        api_keys.c.revoked_at,
        api_keys.c.role,
        tenants.c.disabled_at,
    ).join(tenants, tenants.c.name == api_keys.c.tenant)
    return {
        row.key_id: StoredKey(
            row.tenant, row.secret_sha256, row.revoked_at, row.disabled_at, Role(row.role)
        )
        for row in conn.execute(query)
    }


_INFO_COLUMNS = (
    api_keys.c.key_id,
    api_keys.c.tenant,
    api_keys.c.label,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
    api_keys.c.role,
)


def _api_key(row: Any) -> ApiKey:
    return ApiKey(row.key_id, row.tenant, row.label, row.created_at, row.revoked_at, Role(row.role))


def _tenant_row(conn: Connection, name: str) -> Tenant | None:
    row = conn.execute(sa.select(tenants).where(tenants.c.name == name)).one_or_none()
    return None if row is None else Tenant(row.name, row.created_at, row.disabled_at)


def _tenant(conn: Connection, name: str) -> Tenant:
    tenant = _tenant_row(conn, name)
    if tenant is None:
        raise TenantNotFoundError(f"no tenant {name!r}; create it with `tenant create {name}`")
    return tenant


def _live_key(conn: Connection, key_id: str, now: datetime) -> ApiKey:
    row = conn.execute(sa.select(*_INFO_COLUMNS).where(api_keys.c.key_id == key_id)).one_or_none()
    if row is None:
        raise KeyNotFoundError(f"no API key with id {key_id!r}")
    key = _api_key(row)
    if key.is_revoked(now):
        raise KeyRevokedError(f"API key {key_id!r} was revoked at {_iso(key.revoked_at)}")
    return key


def _set_revoked_at(conn: Connection, key_id: str, when: datetime) -> None:
    conn.execute(sa.update(api_keys).where(api_keys.c.key_id == key_id).values(revoked_at=when))


def _unused_key_id(conn: Connection) -> str:
    # 62**8 ids: a clash is rare, but revoked rows stay forever, so check rather than hope.
    for _ in range(10):
        key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(_KEY_ID_LENGTH))
        taken = conn.execute(sa.select(api_keys.c.key_id).where(api_keys.c.key_id == key_id))
        if taken.first() is None:
            return key_id
    raise RuntimeError("could not find an unused API key id in 10 tries")


def _iso(when: datetime | None) -> str:
    return "-" if when is None else when.isoformat(timespec="seconds")

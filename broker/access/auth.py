"""Who is calling: tenants by API key, agents by join token, both as bearer metadata.

A tenant's key is accepted if it comes from either of two places:

- the settings (``--api-keys KEY=TENANT[:operator],...``, ``GPUBROKER_API_KEYS``), for local use
  and tests: any string, hashed at start-up and held in memory. Its tenant needs no database
  row, and the key is only withdrawn by restarting without it.
- the database (``python -m gpubroker.broker.admin``): ``gpb_<key_id>_<secret>`` keys stored hashed
  (``gpubroker.broker.access.tenants``), which can be revoked, rotated, or disabled with their
  tenant.

Checking a key never waits on SQL. The broker holds every stored key's hash, tenant, revocation
time and tenant state in memory and reloads them all on a worker thread every
``refresh_interval_s`` (2 s by default): a revoked key or a disabled tenant is refused, and a
new key accepted, within that time. A well-formed key whose id the cache lacks wakes the reload
early, but reloads are never closer than a quarter of the interval, so bad keys cannot flood the
database. A failed reload keeps the last snapshot and logs the error. Revocation times are
compared with the clock on every call, so a rotated key's grace period ends on time.

Each key also has a role (``gpubroker.broker.access.roles``): ``caller`` returns the tenant and
the role together.

Open mode: with no key in the settings and no key row in the database (revoked rows count),
every caller is tenant ``default``, an operator. The first key created ends open mode within
one reload; revoking keys never reopens it, because key rows are never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from gpubroker.broker.access.roles import Caller, Role, settings_caller
from gpubroker.broker.access.tenants import StoredKey, hash_secret, load_keys, parse_key
from gpubroker.broker.errors import UnauthenticatedError
from gpubroker.protos.transport import bearer_token

__all__ = [
    "DEFAULT_TENANT",
    "REFRESH_INTERVAL_S",
    "Authenticator",
    "KeyLoader",
    "database_keys",
]

logger = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
"""The tenant of every caller when no API keys are configured (local use)."""

_OPEN_CALLER = Caller(DEFAULT_TENANT, Role.OPERATOR)
"""Every caller in open mode: whoever reaches an open broker may see all of it."""

REFRESH_INTERVAL_S = 2.0
"""How stale the in-memory copy of the stored keys may get."""

KeyLoader = Callable[[], Mapping[str, StoredKey]]
"""Reads every stored key by key id; blocking, so it runs on a worker thread."""


def database_keys(engine: Engine) -> KeyLoader:
    """A loader of the keys stored in ``engine``'s database."""

    def load() -> Mapping[str, StoredKey]:
        with engine.connect() as conn:
            return load_keys(conn)

    return load


def _now() -> datetime:
    return datetime.now(UTC)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    """Maps API keys to callers (tenant and role) and checks the agents' join token.

    ``api_keys`` maps each settings key to ``TENANT`` or ``TENANT:ROLE``
    (``roles.settings_caller``).
    """

    def __init__(
        self,
        api_keys: Mapping[str, str],
        join_token: str | None,
        stored_keys: KeyLoader | None = None,
        *,
        refresh_interval_s: float = REFRESH_INTERVAL_S,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self._settings_keys = tuple(
            (_digest(key), settings_caller(value)) for key, value in api_keys.items()
        )
        self._join_token = join_token.encode() if join_token else None
        self._load = stored_keys
        self._refresh_interval_s = refresh_interval_s
        self._clock = clock
        self._stored: Mapping[str, StoredKey] = {}
        self._miss = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        """True when no API keys exist anywhere and every caller is the default tenant."""
        return not self._settings_keys and not self._stored

    def tenant(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """Returns the caller's tenant; raises ``UnauthenticatedError`` for a bad key."""
        return self.caller(metadata).tenant

    def caller(self, metadata: Iterable[tuple[str, Any]] | None) -> Caller:
        """Returns the caller's tenant and role; raises ``UnauthenticatedError`` for a bad key."""
        if self.is_open:
            return _OPEN_CALLER
        token = bearer_token(metadata)
        if token is None:
            raise UnauthenticatedError("missing API key: send 'authorization: Bearer <key>'")
        return self.key_caller(token)

    def key_caller(self, token: str) -> Caller:
        """The caller an API key names (also outside gRPC, e.g. the status page); raises
        ``UnauthenticatedError`` for a bad key. Open mode accepts any key."""
        if self.is_open:
            return _OPEN_CALLER
        caller = self._settings_caller(token)
        return caller if caller is not None else self._stored_caller(token)

    def check_agent(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Raises ``UnauthenticatedError`` unless the agent presented the join token."""
        if self._join_token is None:
            return
        token = bearer_token(metadata)
        if token is None or not hmac.compare_digest(token.encode(), self._join_token):
            raise UnauthenticatedError("missing or invalid agent join token")

    async def refresh(self) -> None:
        """Reloads the stored keys now, on a worker thread."""
        if self._load is None:
            return
        stored = await asyncio.to_thread(self._load)
        if self.is_open and stored and not self._settings_keys:
            logger.info("API keys found in the database: callers now need a key")
        self._stored = stored

    def start(self) -> None:
        """Starts reloading the stored keys in the background; ``refresh`` first to load them."""
        if self._load is not None and self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="api-keys")

    async def stop(self) -> None:
        """Stops the background reloads."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None

    def _settings_caller(self, token: str) -> Caller | None:
        presented = _digest(token)
        caller = None
        # Compare against every key, in constant time each, so timing reveals nothing.
        for digest, owner in self._settings_keys:
            if hmac.compare_digest(digest, presented):
                caller = owner
        return caller

    def _stored_caller(self, token: str) -> Caller:
        parsed = parse_key(token)
        if parsed is None:
            raise UnauthenticatedError("invalid API key")
        key_id, secret = parsed
        presented = hash_secret(secret)
        stored = self._stored.get(key_id)
        if stored is None:
            self._miss.set()  # perhaps a key made since the last reload
            raise UnauthenticatedError("invalid API key")
        if not hmac.compare_digest(stored.secret_sha256, presented):
            raise UnauthenticatedError("invalid API key")
        if stored.revoked_at is not None and stored.revoked_at <= self._clock():
            raise UnauthenticatedError(f"API key {key_id} has been revoked")
        if stored.tenant_disabled_at is not None:
            raise UnauthenticatedError(f"tenant {stored.tenant!r} is disabled")
        return Caller(stored.tenant, stored.role)

    async def _refresh_loop(self) -> None:
        gap = self._refresh_interval_s / 4
        while True:
            await asyncio.sleep(gap)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._refresh_interval_s - gap):
                    await self._miss.wait()
            self._miss.clear()
            try:
                await self.refresh()
            # Broad on purpose: a dead loop would silently stop revocations taking effect.
            except Exception:
                logger.exception("API key reload failed; keeping the last %d", len(self._stored))

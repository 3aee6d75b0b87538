"""Who is calling: tenants by API key, agents by join token, both as bearer metadata."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from broker.errors import UnauthenticatedError

__all__ = ["DEFAULT_TENANT", "Authenticator", "bearer_token"]

logger = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
"""The tenant of every caller when no API keys are configured (local use)."""


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """Returns the token of an ``authorization: Bearer <token>`` entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class Authenticator:
    """Maps API keys to tenants and checks the agents' join token."""

    def __init__(self, api_keys: Mapping[str, str], join_token: str | None) -> None:
        self._api_keys = [(key.encode(), tenant) for key, tenant in api_keys.items()]
        self._join_token = join_token.encode() if join_token else None

    @property
    def is_open(self) -> bool:
        """True when no API keys are configured and every caller is the default tenant."""
        return not self._api_keys

    def tenant(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """Returns the caller's tenant; raises ``UnauthenticatedError`` for a bad key."""
        if self.is_open:
            return DEFAULT_TENANT
        token = bearer_token(metadata)
        if token is None:
            raise UnauthenticatedError("missing API key: send 'authorization: Bearer <key>'")
        presented = token.encode()
        tenant = None
        # Compare against every key, in constant time each, so timing reveals nothing.
        for key, owner in self._api_keys:
            if hmac.compare_digest(key, presented):
                tenant = owner
        if tenant is None:
            raise UnauthenticatedError("invalid API key")
        return tenant

    def check_agent(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Raises ``UnauthenticatedError`` unless the agent presented the join token."""
        if self._join_token is None:
            return
        token = bearer_token(metadata)
        if token is None or not hmac.compare_digest(token.encode(), self._join_token):
            raise UnauthenticatedError("missing or invalid agent join token")

"""The calling tenant: its API key is checked once per call, before a servicer method runs.

``gpubroker.broker.api.registration.add_servicer`` wraps every method of the client-facing
service with ``authenticated``; the method reads the tenant with ``calling_tenant()``. A call
with a missing or bad key ends with UNAUTHENTICATED before the method is entered. Health and
reflection are registered without the wrapper, so they need no key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextvars import ContextVar
from typing import Any

import grpc

from gpubroker.broker.api.convert import abort_on_broker_error

__all__ = ["Authenticate", "authenticated", "calling_tenant"]

Authenticate = Callable[[Iterable[tuple[str, Any]] | None], str]
"""Maps a call's metadata to its tenant; raises ``UnauthenticatedError`` for a bad key."""

Context = grpc.aio.ServicerContext[Any, Any]

_TENANT: ContextVar[str] = ContextVar("tenant")
"""Set in each call's own asyncio task, so no call sees another's tenant."""


def calling_tenant() -> str:
    """The tenant of the call being served."""
    return _TENANT.get()


def authenticated(
    method: Callable[..., Any],
    authenticate: Authenticate,
    *,
    client_streaming: bool,
    server_streaming: bool,
) -> Callable[..., Any]:
    """``method`` (a servicer method) run only for a caller whose key names a tenant.

    A refused client stream has a few of its messages read first, as for any refusal (see
    ``abort_on_broker_error``).
    """

    async def check(request: Any, context: Context) -> None:
        async with abort_on_broker_error(context, request if client_streaming else None):
            _TENANT.set(authenticate(context.invocation_metadata()))

    if server_streaming:

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await check(request, context)
            async for response in method(request, context):
                yield response

        return stream

    async def unary(request: Any, context: Context) -> Any:
        await check(request, context)
        return await method(request, context)

    return unary

"""The calling tenant: its API key is checked once per call, before a servicer method runs.

``gpubroker.broker.api.registration.add_servicer`` wraps every method of the client-facing
service with ``authenticated``; the method reads the tenant with ``calling_tenant()``, and the
tenant with its role (``access.roles``) with ``calling_caller()``. A call
with a missing or bad key ends with UNAUTHENTICATED before the method is entered. Health and
reflection are registered without the wrapper, so they need no key. Given a ``TenantCalls``
as its ``authenticate``, each call also holds one of its tenant's places while it runs: a call
past the tenant's cap ends with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import grpc

from gpubroker.broker.access.roles import Caller
from gpubroker.broker.api.convert import abort_on_broker_error
from gpubroker.broker.errors import LimitExceededError

__all__ = ["Authenticate", "TenantCalls", "authenticated", "calling_caller", "calling_tenant"]

Authenticate = Callable[[Iterable[tuple[str, Any]] | None], Caller | str]
"""Maps a call's metadata to its caller (or just a tenant, whose role is then ``tenant``);
raises ``UnauthenticatedError`` for a bad key."""

Context = grpc.aio.ServicerContext[Any, Any]

_CALLER: ContextVar[Caller] = ContextVar("caller")
"""Set in each call's own asyncio task, so no call sees another's tenant."""


class TenantCalls:
    """An ``Authenticate`` that also caps the calls each tenant has in flight at once."""

    def __init__(self, authenticate: Authenticate, max_calls: int) -> None:
        self._authenticate = authenticate
        self.max_calls = max_calls
        self._calls: Counter[str] = Counter()

    def __call__(self, metadata: Iterable[tuple[str, Any]] | None) -> Caller | str:
        return self._authenticate(metadata)

    def in_flight(self, tenant: str) -> int:
        """The tenant's calls running now."""
        return self._calls[tenant]

    @contextlib.contextmanager
    def place(self, tenant: str) -> Iterator[None]:
        """Holds one of the tenant's places for the block.

        Raises:
            LimitExceededError: the tenant already has ``max_calls`` calls in flight.
        """
        if self._calls[tenant] >= self.max_calls:
            raise LimitExceededError(
                f"tenant {tenant!r} has {self._calls[tenant]} calls in flight, the most this "
                f"broker allows (max_calls_per_tenant {self.max_calls})"
            )
        self._calls[tenant] += 1
        try:
            yield
        finally:
            self._calls[tenant] -= 1
            if not self._calls[tenant]:
                del self._calls[tenant]


def calling_tenant() -> str:
    """The tenant of the call being served."""
    return _CALLER.get().tenant


def calling_caller() -> Caller:
    """The tenant and role of the call being served."""
    return _CALLER.get()


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

    calls = authenticate if isinstance(authenticate, TenantCalls) else None

    async def check(request: Any, context: Context, places: contextlib.ExitStack) -> None:
        async with abort_on_broker_error(context, request if client_streaming else None):
            found = authenticate(context.invocation_metadata())
            caller = found if isinstance(found, Caller) else Caller(found)
            if calls is not None:
                places.enter_context(calls.place(caller.tenant))
            _CALLER.set(caller)

    if server_streaming:

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            with contextlib.ExitStack() as places:
                await check(request, context, places)
                async for response in method(request, context):
                    yield response

        return stream

    async def unary(request: Any, context: Context) -> Any:
        with contextlib.ExitStack() as places:
            await check(request, context, places)
            return await method(request, context)

    return unary

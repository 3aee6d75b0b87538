"""What one call may hold: uploads that stall or dribble are cut, malformed messages refused.

``CallLimits`` is a server interceptor. For every method it replaces the request deserializer
with one that never raises: bytes that do not parse become ``MALFORMED``, which the call
answers with INVALID_ARGUMENT (grpc's own path logs a traceback and answers UNKNOWN). For the
client streams that upload data (every client-streaming method but the agents' control
stream) it hands the servicer an ``UploadGuard`` instead of grpc's request iterator: a message
must arrive within ``upload_idle_timeout_s``, and once the call has waited on its peer for
``upload_rate_window_s``, the last window must have brought ``upload_min_rate_bytes_per_s``.
A guard that trips raises ``UploadStalledError`` (RESOURCE_EXHAUSTED) from the servicer's
next read, and from every read after it.

Only time spent waiting on the peer counts: a servicer that is slow to read (the disk pushing
back) never makes its peer look slow. ``RunMany`` excuses its peer while outcomes are owed
(``excuse_idle``): a client whose window is full rightly sends nothing until results come.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from gpubroker.broker.config import StreamLimits
from gpubroker.broker.errors import BrokerError, InvalidTaskError, LimitExceededError

__all__ = [
    "MALFORMED",
    "CallLimits",
    "MalformedMessageError",
    "OutcomesOwed",
    "UploadGuard",
    "UploadStalledError",
    "excuse_idle",
]

Context = grpc.aio.ServicerContext[Any, Any]

UNGUARDED_METHODS = frozenset({"/gpubroker.v1.AgentGateway/Connect"})
"""Client streams that are not uploads: the agent's control stream may rightly be quiet
(its liveness is the dispatcher's heartbeat lease)."""


class UploadStalledError(LimitExceededError):
    """An upload sent nothing for too long, or sent too little over its rate window."""


class MalformedMessageError(InvalidTaskError):
    """A request message's bytes are not a valid message of its type."""


class _Malformed:
    """What a request deserializer returns for bytes that do not parse."""

    def __repr__(self) -> str:
        return "MALFORMED"


MALFORMED = _Malformed()
"""The request of a call whose bytes did not parse."""


def _malformed_error(method: str) -> MalformedMessageError:
    return MalformedMessageError(f"a request message of {method} is not a valid protobuf message")


class UploadGuard:
    """A call's request iterator, bounded in time and rate (see the module docstring)."""

    def __init__(self, requests: AsyncIterator[Any], limits: StreamLimits, method: str) -> None:
        self._source = requests
        self._requests: AsyncIterator[Any] | None = None
        """Made on the first read: grpc's receiver starts a generator when asked for its
        iterator, and one never read (a call refused before its first message) warns."""
        self._limits = limits
        self._method = method
        self._excused: Callable[[], bool] | None = None
        self._waited_s = 0.0
        """Seconds spent waiting on the peer so far."""
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        """(waited_s at arrival, bytes) of the messages of the last rate window."""
        self._error: BrokerError | None = None

    def excuse_idle(self, excused: Callable[[], bool]) -> None:
        """While ``excused()`` is true the peer may send nothing; its rate is not checked."""
        self._excused = excused

    def __aiter__(self) -> UploadGuard:
        return self

    async def __anext__(self) -> Any:
        if self._error is not None:
            raise self._error
        started = time.monotonic()
        try:
            message = await self._next()
        except (TimeoutError, UploadStalledError) as exc:
            self._error = exc if isinstance(exc, UploadStalledError) else self._stalled()
            raise self._error from None
        self._waited_s += time.monotonic() - started
        if message is MALFORMED:
            self._error = _malformed_error(self._method)
            raise self._error
        self._check_rate(_size(message))
        return message

    async def _next(self) -> Any:
        if self._requests is None:
            self._requests = aiter(self._source)
        idle_s = self._limits.upload_idle_timeout_s
        if self._excused is None:
            async with asyncio.timeout(idle_s):
                return await anext(self._requests)
        # The read must survive a wait that turns out excused, so it runs as its own task.
        read = asyncio.ensure_future(anext(self._requests))
        try:
            while not (await asyncio.wait((read,), timeout=idle_s))[0]:
                if not self._excused():
                    raise self._stalled()
            return read.result()
        finally:
            read.cancel()

    def _stalled(self) -> UploadStalledError:
        return UploadStalledError(
            f"upload stalled: no message for {self._limits.upload_idle_timeout_s:g} s"
        )

    def _check_rate(self, nbytes: int) -> None:
        minimum, window_s = (
            self._limits.upload_min_rate_bytes_per_s,
            self._limits.upload_rate_window_s,
        )
        if minimum == 0 or self._excused is not None:
            return
        now = self._waited_s
        self._window.append((now, nbytes))
        while self._window and self._window[0][0] < now - window_s:
            self._window.popleft()
        received = sum(n for _, n in self._window)
        if now >= window_s and received < minimum * window_s:
            self._error = UploadStalledError(
                f"upload slower than {minimum / 1024:g} KiB/s: {received} bytes in the last "
                f"{window_s:g} s"
            )
            raise self._error


def excuse_idle(requests: AsyncIterator[Any], excused: Callable[[], bool]) -> None:
    """Lets a guarded call's peer send nothing while ``excused()`` (no-op when unguarded)."""
    if isinstance(requests, UploadGuard):
        requests.excuse_idle(excused)


class OutcomesOwed:
    """How many answers a call owes its peer: requests taken less outcomes sent."""

    def __init__(self) -> None:
        self.count = 0

    def taken(self, n: int) -> None:
        """``n`` more requests will each be answered."""
        self.count += n

    def answered(self, n: int) -> None:
        """``n`` outcomes went out."""
        self.count -= n

    def any(self) -> bool:
        """Whether the peer is waiting on the call (so it may rightly send nothing)."""
        return self.count > 0


def _size(message: Any) -> int:
    if isinstance(message, memoryview):  # a chunk on the fast path (protos.frames)
        return message.nbytes
    return int(message.ByteSize())


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # any parse failure: the call answers INVALID_ARGUMENT, no traceback
            return MALFORMED

    return deserialize


class CallLimits(grpc.aio.ServerInterceptor):
    """Refuses malformed requests and bounds uploads (see the module docstring)."""

    def __init__(self, limits: StreamLimits) -> None:
        self._limits = limits

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        streaming = (handler.request_streaming, handler.response_streaming)
        behavior = _behavior(handler)
        guard = self._limits if method not in UNGUARDED_METHODS else None
        wrapped = _WRAPPERS[streaming](behavior, method, guard)
        return _HANDLERS[streaming](
            wrapped,
            request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def _behavior(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[..., Any]:
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if (behavior := getattr(handler, name)) is not None:
            return behavior  # type: ignore[no-any-return]
    raise ValueError("a method handler with no behavior")


async def _refuse(context: Context, error: BrokerError) -> None:
    code = (
        grpc.StatusCode.INVALID_ARGUMENT
        if isinstance(error, InvalidTaskError)
        else grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    await context.abort(code, str(error))


_Guard = StreamLimits | None


def _unary_unary(behavior: Callable[..., Any], method: str, _: _Guard) -> Callable[..., Any]:
    async def call(request: Any, context: Context) -> Any:
        if request is MALFORMED:
            await _refuse(context, _malformed_error(method))
        return await behavior(request, context)

    return call


def _unary_stream(behavior: Callable[..., Any], method: str, _: _Guard) -> Callable[..., Any]:
    async def call(request: Any, context: Context) -> AsyncIterator[Any]:
        if request is MALFORMED:
            await _refuse(context, _malformed_error(method))
        async for response in behavior(request, context):
            yield response

    return call


def _requests(requests: AsyncIterator[Any], method: str, limits: _Guard) -> AsyncIterator[Any]:
    if limits is not None:
        return UploadGuard(requests, limits, method)
    return _checked(requests, method)


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if request is MALFORMED:
            raise _malformed_error(method)
        yield request


def _stream_unary(behavior: Callable[..., Any], method: str, limits: _Guard) -> Callable[..., Any]:
    async def call(requests: AsyncIterator[Any], context: Context) -> Any:
        try:
            return await behavior(_requests(requests, method, limits), context)
        except (UploadStalledError, MalformedMessageError) as exc:  # not mapped by the servicer
            await _refuse(context, exc)

    return call


def _stream_stream(behavior: Callable[..., Any], method: str, limits: _Guard) -> Callable[..., Any]:
    async def call(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        try:
            async for response in behavior(_requests(requests, method, limits), context):
                yield response
        except (UploadStalledError, MalformedMessageError) as exc:
            await _refuse(context, exc)

    return call


_WRAPPERS: dict[tuple[bool, bool], Callable[[Callable[..., Any], str, _Guard], Callable[..., Any]]]
_WRAPPERS = {
    (False, False): _unary_unary,
    (False, True): _unary_stream,
    (True, False): _stream_unary,
    (True, True): _stream_stream,
}

_HANDLERS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}

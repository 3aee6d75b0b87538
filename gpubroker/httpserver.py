"""A small HTTP server for the processes' read-only pages: ``/metrics`` and whatever else they
register (the broker's status page, say); every other path is a 404.

It lives beside the five packages because the broker and the agent both serve one and neither
may import the other; it imports nothing of the project. Requests are answered on threads of
their own (``ThreadingHTTPServer``), so a slow scrape never holds up the event loop. A handler
that must read the event loop's state may be a coroutine function: it is then run on the loop
the server was given, and the thread waits for its answer.

Usage::

    server = HttpServer("127.0.0.1:9464", loop=asyncio.get_running_loop())
    server.add_route("/metrics", lambda request: Response(200, "text/plain", b"..."))
    port = server.start()
    ...
    server.close()
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Handler", "HttpServer", "Request", "Response", "metrics_handler", "split_address"]

logger = logging.getLogger(__name__)

_ASYNC_TIMEOUT_S = 10.0
"""Longest a coroutine handler may take before the request gets a 503."""


@dataclass(frozen=True, slots=True)
class Request:
    """One GET (or HEAD) request, as a handler sees it."""

    path: str
    """The path without its query string, e.g. ``/metrics``."""
    query: Mapping[str, Sequence[str]]
    """The query string's parameters: name -> every value given (``parse_qs``)."""
    headers: Mapping[str, str]
    """The request headers; look-ups ignore case."""
    client: str
    """The peer's address (``host:port``)."""

    def param(self, name: str, default: str = "") -> str:
        """The first value of the query parameter ``name``, or ``default``."""
        values = self.query.get(name)
        return values[0] if values else default


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler answers."""

    status: int
    content_type: str
    body: bytes
    headers: Sequence[tuple[str, str]] = field(default_factory=tuple)
    """Extra headers, e.g. ``("Cache-Control", "no-store")``."""


Handler = Callable[[Request], "Response | tuple[int, str, bytes] | Awaitable[Response]"]
"""A route's handler: a ``Response`` (or a ``(status, content_type, body)`` tuple), or a
coroutine function returning one (run on the server's event loop)."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) as ``(host, port)``; an empty host is 0.0.0.0.

    Raises:
        ValueError: no port, or a port that is not a number from 0 to 65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


class HttpServer:
    """Serves registered GET routes on ``host:port`` from a background thread.

    Args:
        address: ``host:port``; port 0 picks a free one (``start`` returns it).
        loop: the event loop coroutine handlers run on; None allows plain handlers only.
    """

    def __init__(self, address: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._address = split_address(address)
        self._loop = loop
        self._routes: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port once started; None before."""
        return None if self._server is None else int(self._server.server_address[1])

    @property
    def paths(self) -> frozenset[str]:
        """The paths routed now."""
        with self._lock:
            return frozenset(self._routes)

    def add_route(self, path: str, handler: Handler) -> None:
        """Answers GET ``path`` (exactly; no prefix matching) with ``handler``; may be called
        before or after ``start``.

        Raises:
            ValueError: ``path`` does not start with ``/`` or is routed already.
        """
        if not path.startswith("/"):
            raise ValueError(f"a route's path starts with '/', got {path!r}")
        with self._lock:
            if path in self._routes:
                raise ValueError(f"{path} is routed already")
            self._routes[path] = handler

    def start(self) -> int:
        """Binds the address and starts answering; returns the bound port.

        Raises:
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("the HTTP server is started already")
        server_class = _Server6 if ":" in self._address[0] else _Server
        server = server_class(self._address, _RequestHandler)
        server.owner = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"http:{self.port}", daemon=True
        )
        self._thread.start()
        return int(server.server_address[1])

    def close(self) -> None:
        """Stops answering and releases the port; a no-op if never started."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def answer(self, request: Request) -> Response:
        """The response to ``request``: its route's handler's, or 404 when none is routed."""
        with self._lock:
            handler = self._routes.get(request.path)
        if handler is None:
            return _text(HTTPStatus.NOT_FOUND, f"no page at {request.path}\n")
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = self._await(result)
        except Exception:
            logger.exception("HTTP handler for %s failed", request.path)
            return _text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")
        return result if isinstance(result, Response) else Response(*result)

    def _await(self, awaitable: Awaitable[Any]) -> Response:
        if self._loop is None:
            raise RuntimeError("a coroutine handler needs the server to be given a loop")

        async def run() -> Any:
            return await awaitable

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            result = future.result(timeout=_ASYNC_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, "timed out\n")
        return result if isinstance(result, Response) else Response(*result)


def metrics_handler(registry: Any, *, on_loop: bool = True) -> Handler:
    """A handler that answers with ``registry``'s metrics (a prometheus_client
    ``CollectorRegistry``) in the format the scraper's ``Accept`` header asks for.

    ``on_loop``: collect on the server's event loop (a coroutine handler), so collectors that
    read the loop's state never see it half-changed; it takes a millisecond or so.
    """
    from prometheus_client.exposition import choose_encoder

    def handle(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(200, content_type, encoder(registry))

    async def handle_on_loop(request: Request) -> Response:
        return handle(request)

    return handle_on_loop if on_loop else handle


def _text(status: HTTPStatus, text: str) -> Response:
    return Response(int(status), "text/plain; charset=utf-8", text.encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: HttpServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _respond(self, *, body: bool) -> None:
        parts = urlsplit(self.path)
        request = Request(
            path=parts.path,
            query=parse_qs(parts.query),
            headers=_Headers(self.headers.items()),
            client=f"{self.client_address[0]}:{self.client_address[1]}",
        )
        response = self.server.owner.answer(request)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _Headers(dict[str, str]):
    """Request headers whose look-ups ignore case."""

    def __init__(self, items: Any) -> None:
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

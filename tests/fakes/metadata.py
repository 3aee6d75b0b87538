"""A fake GCE metadata server on 127.0.0.1: real HTTP, hanging GETs, and test controls.

It serves ``instance/preempted`` and ``instance/maintenance-event`` under
``/computeMetadata/v1/`` the way the real server does: every reply carries an ``ETag`` and
``Metadata-Flavor: Google``; a request without ``Metadata-Flavor: Google`` gets 403; with
``wait_for_change=true`` it answers at once when ``last_etag`` differs from the value's ETag,
and otherwise holds the request until the value changes or ``timeout_sec`` passes.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qsl, urlsplit

__all__ = ["FakeMetadataServer", "MetadataRequest"]

ROOT = "/computeMetadata/v1/"
PREEMPTED_KEY = "instance/preempted"
MAINTENANCE_KEY = "instance/maintenance-event"


@dataclass(frozen=True, slots=True)
class MetadataRequest:
    """One request the fake received."""

    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    """Header names lower-cased."""


class _Server(ThreadingHTTPServer):
    fake: FakeMetadataServer

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hang up on hanging GETs all the time (the watcher's stop()); not an error.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = MetadataRequest(url.path, dict(parse_qsl(url.query)), headers)
        status, body, etag = self.server.fake.answer(request)
        payload = body.encode()
        self.send_response(status)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", "application/text")
        self.send_header("Content-Length", str(len(payload)))
        if etag is not None:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


class FakeMetadataServer:
    """Serves the two keys on an ephemeral port; use as a context manager."""

    def __init__(self, wait_timeout_s: float = 30.0) -> None:
        self._wait_timeout_s = wait_timeout_s
        self._changed = threading.Condition()
        self._values = {PREEMPTED_KEY: "FALSE", MAINTENANCE_KEY: "NONE"}
        self._versions = dict.fromkeys(self._values, 1)
        self._requests: list[MetadataRequest] = []
        self._failures: list[int] = []
        self._waiting = 0
        self._closed = False
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        # A short poll interval keeps close() from waiting half a second in shutdown().
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FakeMetadataServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The base URL to give the watcher."""
        return f"http://127.0.0.1:{self._server.server_address[1]}{ROOT}"

    @property
    def requests(self) -> tuple[MetadataRequest, ...]:
        """Every request so far, oldest first."""
        with self._changed:
            return tuple(self._requests)

    @property
    def waiting(self) -> int:
        """How many hanging GETs are held right now."""
        with self._changed:
            return self._waiting

    def preempt(self) -> None:
        """Sets ``instance/preempted`` to ``TRUE``, as GCE does when it reclaims a Spot VM."""
        self._set(PREEMPTED_KEY, "TRUE")

    def set_maintenance(self, value: str) -> None:
        """Sets ``instance/maintenance-event`` (``NONE``, ``TERMINATE_ON_HOST_MAINTENANCE``...)."""
        self._set(MAINTENANCE_KEY, value)

    def fail_next(self, count: int = 1, status: int = 500) -> None:
        """Answers the next ``count`` requests, whatever they ask, with ``status``."""
        with self._changed:
            self._failures.extend([status] * count)

    def close(self) -> None:
        """Releases every held request and stops the server."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def answer(self, request: MetadataRequest) -> tuple[int, str, str | None]:
        """Status, body and ETag for ``request``; blocks while a hanging GET waits."""
        with self._changed:
            self._requests.append(request)
            if self._failures:
                return self._failures.pop(0), "injected failure", None
            if request.headers.get("metadata-flavor") != "Google":
                return 403, "Missing Metadata-Flavor:Google header.", None
            key = request.path.removeprefix(ROOT)
            if not request.path.startswith(ROOT) or key not in self._values:
                return 404, "not found", None
            if request.query.get("wait_for_change") == "true":
                self._hold(key, request.query)
            return 200, self._values[key], self._etag(key)

    def _hold(self, key: str, query: Mapping[str, str]) -> None:
        last_etag = query.get("last_etag")
        if last_etag is not None and last_etag != self._etag(key):
            return
        version = self._versions[key]
        timeout_s = float(query.get("timeout_sec", self._wait_timeout_s))
        self._waiting += 1
        try:
            self._changed.wait_for(
                lambda: self._closed or self._versions[key] != version, timeout_s
            )
        finally:
            self._waiting -= 1

    def _etag(self, key: str) -> str:
        return f"{self._versions[key]:016x}"

    def _set(self, key: str, value: str) -> None:
        with self._changed:
            if self._values[key] != value:
                self._values[key] = value
                self._versions[key] += 1
                self._changed.notify_all()

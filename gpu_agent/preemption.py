"""Watches the GCE metadata server for a preemption or host-maintenance notice.

A Spot VM has 30 s between the preemption notice and power-off (docs/deploy.md, section 7), so
the agent must hear of it at once, not on its next poll. Each key is read with a hanging GET
(``?wait_for_change=true&last_etag=...``) that the metadata server answers as soon as the value
changes. The HTTP client is a few lines over asyncio streams rather than urllib in a thread:
cancelling it closes the socket at once, where a thread would sit in a hanging GET for minutes
and hold up the event loop's shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import inspect
import io
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlencode, urlsplit

from gpubroker.gpu_agent.config import Backoff

__all__ = [
    "DEFAULT_METADATA_URL",
    "KINDS",
    "MAINTENANCE_EVENT",
    "PREEMPTED",
    "NoticeCallback",
    "PreemptionWatcher",
    "metadata_url",
]

logger = logging.getLogger(__name__)

DEFAULT_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/"
"""The metadata server every GCE VM can reach."""

PREEMPTED = "preempted"
"""Notice kind: ``instance/preempted`` became ``TRUE`` (a Spot VM is being reclaimed)."""
MAINTENANCE_EVENT = "maintenance-event"
"""Notice kind: ``instance/maintenance-event`` left ``NONE``; the value says what comes."""
KINDS = (PREEMPTED, MAINTENANCE_EVENT)
"""Every notice kind; each is also the key's name under ``instance/``."""

NoticeCallback = Callable[[str, str], Awaitable[None] | None]
"""``on_notice(kind, value)``: a plain function or a coroutine function."""

_DEFAULT_BACKOFF = Backoff(initial_s=1.0, max_s=30.0)


def metadata_url(environ: Mapping[str, str] = os.environ) -> str:
    """The metadata server's base URL, honouring ``GCE_METADATA_HOST`` as Google's libraries do.

    ``GCE_METADATA_HOST`` (or its older name ``GCE_METADATA_ROOT``) is a ``host[:port]`` that
    replaces ``metadata.google.internal``, e.g. for an emulator.
    """
    host = environ.get("GCE_METADATA_HOST") or environ.get("GCE_METADATA_ROOT")
    return f"http://{host}/computeMetadata/v1/" if host else DEFAULT_METADATA_URL


@dataclass(frozen=True, slots=True)
class _Endpoint:
    host: str
    port: int
    netloc: str
    path: str
    """Ends with a slash; keys are appended to it."""


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    value: str
    etag: str | None
    is_metadata_server: bool
    """The reply carried ``Metadata-Flavor: Google``, as only a real metadata server's do."""


def _endpoint(base_url: str) -> _Endpoint:
    url = urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"metadata URL must be http://host[:port]/path/, not {base_url!r}")
    path = url.path if url.path.endswith("/") else url.path + "/"
    return _Endpoint(url.hostname, url.port or 80, url.netloc, path)


class _Received:
    """Hands ``http.client`` a response already read, so it does the parsing (chunked too)."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self._raw))


def _parse(raw: bytes) -> _Reply:
    response = http.client.HTTPResponse(cast(socket.socket, _Received(raw)))
    response.begin()
    body = response.read().decode("utf-8", errors="replace")
    return _Reply(
        status=response.status,
        value=body.strip(),
        etag=response.getheader("ETag"),
        is_metadata_server=response.getheader("Metadata-Flavor") == "Google",
    )


async def _get(endpoint: _Endpoint, target: str, timeout_s: float) -> _Reply:
    """One GET over a fresh connection, read to EOF.

    Raises:
        OSError: cannot connect, the connection broke, or ``timeout_s`` passed (TimeoutError).
        http.client.HTTPException: the reply is not HTTP.
    """
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {endpoint.netloc}\r\n"
        "Metadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    )
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        try:
            writer.write(request.encode("ascii"))
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
    return _parse(raw)


def _is_notice(kind: str, value: str) -> bool:
    if kind == PREEMPTED:
        return value.upper() == "TRUE"
    return value.upper() not in ("", "NONE")


class PreemptionWatcher:
    """Calls ``on_notice(kind, value)`` once per kind when GCE announces the VM's end.

    Kinds are ``PREEMPTED`` (value ``TRUE``) and ``MAINTENANCE_EVENT`` (the event, e.g.
    ``TERMINATE_ON_HOST_MAINTENANCE``). Use ``await run()`` in a task group, or ``start()`` and
    ``stop()``. ``run()`` returns once both kinds have been noticed, at once when ``base_url``
    is None (a local agent), and after one info line when no metadata server answers at start
    (not on GCE) unless ``required``. Failed or refused requests are logged and retried with
    ``backoff``. An exception from ``on_notice`` ends ``run()`` with it.
    """

    def __init__(
        self,
        base_url: str | None,
        on_notice: NoticeCallback,
        *,
        required: bool = False,
        backoff: Backoff | None = None,
        poll_timeout_s: float = 60.0,
        probe_timeout_s: float = 2.0,
    ) -> None:
        self._endpoint = _endpoint(base_url) if base_url is not None else None
        self._on_notice = on_notice
        self._required = required
        self._backoff = backoff or _DEFAULT_BACKOFF
        self._poll_timeout_s = poll_timeout_s
        self._probe_timeout_s = probe_timeout_s
        self._noticed: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def noticed(self) -> frozenset[str]:
        """The kinds reported so far."""
        return frozenset(self._noticed)

    async def run(self) -> None:
        """Watches both keys until each has been noticed; cancel it to stop watching."""
        if self._endpoint is None:
            logger.debug("preemption watcher disabled (no metadata server URL)")
            return
        if not self._required and not await self._is_on_gce(self._endpoint):
            return
        async with asyncio.TaskGroup() as group:
            for kind in KINDS:
                group.create_task(self._watch(self._endpoint, kind), name=f"watch-{kind}")

    def start(self) -> None:
        """Runs ``run()`` in a task of its own until ``stop()``; a second call does nothing."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="preemption-watcher")

    async def stop(self) -> None:
        """Cancels the watch started by ``start()`` and waits for it; closes any hanging GET.

        Raises:
            Exception: whatever ``on_notice`` raised, if it ended the watch before.
        """
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _is_on_gce(self, endpoint: _Endpoint) -> bool:
        target = f"{endpoint.path}instance/{PREEMPTED}"
        try:
            reply = await _get(endpoint, target, self._probe_timeout_s)
        except (OSError, http.client.HTTPException) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            if reply.is_metadata_server:
                return True
            reason = f"HTTP {reply.status} without Metadata-Flavor: Google"
        logger.info(
            "no GCE metadata server at http://%s%s (%s); not watching for preemption",
            endpoint.netloc, endpoint.path, reason,
        )  # fmt: skip
        return False

    async def _watch(self, endpoint: _Endpoint, kind: str) -> None:
        # An ETag no value has: the first hanging GET returns the current value at once, so a
        # notice that came before the watcher started is not missed.
        etag: str | None = "0"
        failures = 0
        while True:
            reply = await self._poll(endpoint, kind, etag)
            if reply is None:
                failures += 1
                await asyncio.sleep(self._backoff.delay_s(failures))
                continue
            if failures:
                logger.info("metadata server answers for %s again", kind)
            failures = 0
            if _is_notice(kind, reply.value):
                await self._notify(kind, reply.value)
                return
            # Without an ETag, wait for the next change (no last_etag) instead of spinning.
            etag = reply.etag

    async def _poll(self, endpoint: _Endpoint, kind: str, etag: str | None) -> _Reply | None:
        """The key's value once it differs from ``etag``; None (logged) when the GET failed."""
        # timeout_sec is whole seconds on GCE.
        timeout_sec = max(1, round(self._poll_timeout_s))
        query = {"wait_for_change": "true", "timeout_sec": str(timeout_sec)}
        if etag is not None:
            query["last_etag"] = etag
        target = f"{endpoint.path}instance/{kind}?{urlencode(query)}"
        try:
            # Past its timeout_sec the server answers with the unchanged value; the margin
            # covers a slow reply, and a server that ignores timeout_sec.
            reply = await _get(endpoint, target, self._poll_timeout_s + 10.0)
        except (OSError, http.client.HTTPException) as exc:
            logger.warning("watching %s on the metadata server failed: %r; retrying", kind, exc)
            return None
        if reply.status != 200:
            # The metadata server answers 503 during maintenance; the official sample retries.
            logger.warning("metadata server answered HTTP %d for %s; retrying", reply.status, kind)
            return None
        return reply

    async def _notify(self, kind: str, value: str) -> None:
        if kind in self._noticed:
            return
        self._noticed.add(kind)
        logger.warning("GCE %s notice: %s", kind, value)
        result = self._on_notice(kind, value)
        if inspect.isawaitable(result):
            await result

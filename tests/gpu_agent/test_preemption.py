"""The preemption watcher against a fake GCE metadata server over real HTTP."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from gpubroker.gpu_agent.config import Backoff
from gpubroker.gpu_agent.preemption import (
    DEFAULT_METADATA_URL,
    MAINTENANCE_EVENT,
    PREEMPTED,
    PreemptionWatcher,
    metadata_url,
)
from tests.fakes.metadata import FakeMetadataServer
from tests.support.waiting import wait_for

FAST = Backoff(initial_s=0.01, max_s=0.05)


class Notices:
    """An ``on_notice`` callback that records what it was told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    async def __call__(self, kind: str, value: str) -> None:
        self.seen.append((kind, value))
        self.changed.set()

    async def wait_for(self, count: int, timeout_s: float = 2.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.seen) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def metadata() -> Iterator[FakeMetadataServer]:
    with FakeMetadataServer() as server:
        yield server


@pytest.fixture
async def watching(
    metadata: FakeMetadataServer,
) -> AsyncIterator[tuple[PreemptionWatcher, Notices]]:
    """A started watcher whose two hanging GETs are already held by the server."""
    notices = Notices()
    watcher = PreemptionWatcher(metadata.url, notices, backoff=FAST)
    watcher.start()
    await wait_for(lambda: metadata.waiting == 2, 2.0, interval=0.005)
    yield watcher, notices
    await watcher.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_preemption_is_noticed_within_a_fraction_of_a_second(
    metadata: FakeMetadataServer, watching: tuple[PreemptionWatcher, Notices]
) -> None:
    watcher, notices = watching

    started = time.monotonic()
    metadata.preempt()
    await notices.wait_for(1)

    assert time.monotonic() - started < 0.5
    assert notices.seen == [(PREEMPTED, "TRUE")]
    assert watcher.noticed == {PREEMPTED}


async def test_a_maintenance_event_is_noticed_with_its_value(
    metadata: FakeMetadataServer, watching: tuple[PreemptionWatcher, Notices]
) -> None:
    _, notices = watching

    metadata.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE")
    await notices.wait_for(1)

    assert notices.seen == [(MAINTENANCE_EVENT, "TERMINATE_ON_HOST_MAINTENANCE")]


async def test_each_kind_is_reported_once_and_run_returns_after_both(
    metadata: FakeMetadataServer,
) -> None:
    seen: list[tuple[str, str]] = []
    watcher = PreemptionWatcher(metadata.url, lambda kind, value: seen.append((kind, value)))
    run = asyncio.create_task(watcher.run())
    await wait_for(lambda: metadata.waiting == 2, 2.0, interval=0.005)

    metadata.set_maintenance("MIGRATE_ON_HOST_MAINTENANCE")
    await wait_for(lambda: len(seen) == 1, 2.0, interval=0.005)
    metadata.set_maintenance("NONE")
    metadata.set_maintenance("TERMINATE_ON_HOST_MAINTENANCE")
    metadata.preempt()
    await asyncio.wait_for(run, timeout=2)

    assert sorted(seen) == [
        (MAINTENANCE_EVENT, "MIGRATE_ON_HOST_MAINTENANCE"),
        (PREEMPTED, "TRUE"),
    ]


async def test_a_preemption_that_came_before_the_watcher_is_reported_at_once(
    metadata: FakeMetadataServer,
) -> None:
    metadata.preempt()
    notices = Notices()
    watcher = PreemptionWatcher(metadata.url, notices)

    watcher.start()
    await notices.wait_for(1)
    await watcher.stop()

    assert notices.seen == [(PREEMPTED, "TRUE")]


async def test_every_request_sends_the_metadata_flavor_header_and_waits_for_change(
    metadata: FakeMetadataServer, watching: tuple[PreemptionWatcher, Notices]
) -> None:
    requests = metadata.requests

    assert requests
    assert all(r.headers["metadata-flavor"] == "Google" for r in requests)
    watches = [r for r in requests if r.query.get("wait_for_change") == "true"]
    assert {r.path.rsplit("/", 1)[1] for r in watches} == {PREEMPTED, MAINTENANCE_EVENT}
    assert all("last_etag" in r.query and "timeout_sec" in r.query for r in watches)


def test_the_fake_server_refuses_a_request_without_the_metadata_flavor_header(
    metadata: FakeMetadataServer,
) -> None:
    url = metadata.url + "instance/preempted"

    with pytest.raises(urllib.error.HTTPError) as exc_info:
        urllib.request.urlopen(url, timeout=5)
    with urllib.request.urlopen(
        urllib.request.Request(url, headers={"Metadata-Flavor": "Google"}), timeout=5
    ) as reply:
        value = reply.read()

    assert exc_info.value.code == 403
    exc_info.value.close()
    assert value == b"FALSE"


@pytest.mark.slow  # waits out two 1 s poll timeouts
async def test_a_hanging_get_that_times_out_is_simply_repeated(
    metadata: FakeMetadataServer,
) -> None:
    notices = Notices()
    watcher = PreemptionWatcher(metadata.url, notices, poll_timeout_s=1.0)
    watcher.start()
    # The probe, two GETs answered at once, two held for a second, then two more.
    await wait_for(lambda: len(metadata.requests) >= 7, 3.0, interval=0.005)

    metadata.preempt()
    await notices.wait_for(1)
    await watcher.stop()

    assert notices.seen == [(PREEMPTED, "TRUE")]


async def test_server_errors_are_logged_and_retried(
    metadata: FakeMetadataServer, caplog: pytest.LogCaptureFixture
) -> None:
    metadata.fail_next(4, status=500)
    notices = Notices()
    watcher = PreemptionWatcher(metadata.url, notices, backoff=FAST)

    watcher.start()
    await wait_for(lambda: metadata.waiting == 2, 2.0, interval=0.005)
    metadata.preempt()
    await notices.wait_for(1)
    await watcher.stop()

    assert notices.seen == [(PREEMPTED, "TRUE")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("HTTP 500" in m for m in warnings) == 3  # the probe took the first failure


async def test_an_unreachable_server_ends_the_watch_with_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="gpubroker.gpu_agent.preemption")
    notices = Notices()
    watcher = PreemptionWatcher(f"http://127.0.0.1:{closed_port()}/computeMetadata/v1/", notices)

    await asyncio.wait_for(watcher.run(), timeout=2)

    records = [r for r in caplog.records if r.name == "gpubroker.gpu_agent.preemption"]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "not watching for preemption" in records[0].getMessage()
    assert notices.seen == []


async def test_a_required_watcher_keeps_retrying_an_unreachable_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/computeMetadata/v1/"
    watcher = PreemptionWatcher(url, Notices(), required=True, backoff=FAST)

    def failures_logged() -> int:
        return sum(r.levelno == logging.WARNING for r in caplog.records)

    watcher.start()
    await wait_for(lambda: failures_logged() >= 4, 5.0, "four logged failures")
    await watcher.stop()

    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) >= 4  # both keys, retried with backoff


async def test_stop_is_prompt_while_hanging_gets_are_held(
    watching: tuple[PreemptionWatcher, Notices],
) -> None:
    watcher, notices = watching

    started = time.monotonic()
    await watcher.stop()

    assert time.monotonic() - started < 0.2
    assert notices.seen == []


@pytest.mark.parametrize("run", [PreemptionWatcher.run, PreemptionWatcher.stop])
async def test_a_watcher_without_a_url_is_disabled(
    run: Callable[[PreemptionWatcher], Awaitable[None]],
) -> None:
    watcher = PreemptionWatcher(None, Notices())
    watcher.start()

    await asyncio.wait_for(run(watcher), timeout=0.5)

    assert watcher.noticed == frozenset()


def test_the_metadata_url_honours_gce_metadata_host() -> None:
    assert metadata_url({}) == DEFAULT_METADATA_URL
    assert metadata_url({"GCE_METADATA_HOST": "127.0.0.1:8080"}) == (
        "http://127.0.0.1:8080/computeMetadata/v1/"
    )


def test_a_metadata_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="must be http"):
        PreemptionWatcher("https://metadata.google.internal/", Notices())

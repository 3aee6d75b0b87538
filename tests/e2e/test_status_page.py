"""The status page in a real browser: a broker and a real agent run a few tasks, headless
Chromium loads ``/status``, and its DOM shows the agent, a task's failure and the queue depth.

The screenshot is kept under the test's tmp dir; its path is printed (``pytest -s`` or the
captured output of a failure shows it). Without a ``chromium`` binary the test fails: CI
installs Debian's package.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gpubroker.client import Client
from gpubroker.client.errors import InvalidArgumentError, TaskFailedError
from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.grpcurl import grpcurl
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # end to end: real broker, agent and browser processes

KEYS = {"key-a": "tenant-a", "key-ops": "ops:operator"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed: `apt-get install chromium` (.ci/run does as root)")
    return found


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, str]]:
    root = tmp_path_factory.mktemp("status-page")
    http = f"127.0.0.1:{_free_port()}"
    broker = BrokerProcess(root, api_keys=KEYS, env={"GPUBROKER_METRICS": http}).start()
    # No prefetch: a queued task stays in the broker's queue, so the depth shown is exact.
    agent = AgentProcess(
        root, broker.address, "page-agent", slots=1, extra_args=["--prefetch", "0"]
    ).start()
    try:
        yield broker, http
    finally:
        agent.stop()
        broker.stop()


def test_chromium_shows_the_agent_a_failure_and_the_queue(
    stack: tuple[BrokerProcess, str], tmp_path: Path
) -> None:
    broker, http = stack
    with Client(broker.address, "key-a") as client:
        client.run("sum", [torch.ones(4)], timeout=60)
        failing = client.submit("matmul", [torch.ones(2, 3), torch.ones(2, 3)])
        with pytest.raises((TaskFailedError, InvalidArgumentError)):
            failing.result(timeout=60)
        blocker = client.submit("sleep", [torch.ones(1)], seconds=60.0)
        queued = [client.submit("echo", [torch.ones(1)]) for _ in range(3)]
        wait_until(lambda: blocker.status().state.value == "running", 30, "the sleep task running")
        failure = failing.status().error_message
        url = f"http://{http}/status"
        shot = tmp_path / "status.png"

        done = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
             "--window-size=1400,1600", f"--screenshot={shot}", "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        status = json.loads(_get(f"http://{http}/status.json")[1])
        for handle in (blocker, *queued):
            handle.cancel()

    print(f"status page screenshot: {shot}")
    dom = done.stdout
    assert done.returncode == 0, done.stderr
    assert shot.stat().st_size > 0
    assert "page-agent" in dom
    assert failure and failure[:60] in dom.replace("&#x27;", "'").replace("&quot;", '"')
    assert '<span id="queued-tasks">3</span>' in dom
    assert 'http-equiv="refresh"' in dom
    assert status["operatorView"] is True and status["queuedTasks"] == "3"
    assert [a["agentId"] for a in status["agents"]] == ["page-agent"]


def test_loopback_needs_no_key_and_every_other_path_is_not_found(
    stack: tuple[BrokerProcess, str],
) -> None:
    _, http = stack

    assert _get(f"http://{http}/status")[0] == 200
    assert _get(f"http://{http}/status.json")[0] == 200
    assert _get(f"http://{http}/nothing")[0] == 404


def test_grpcurl_gets_the_status_each_key_may_see(stack: tuple[BrokerProcess, str]) -> None:
    broker, _ = stack

    def status(key: str) -> dict[str, Any]:
        reply = grpcurl(
            "-plaintext", "-d", '{"recent_tasks": 5}', "-H", f"authorization: Bearer {key}",
            broker.address, "gpubroker.v1.Broker/GetStatus",
        )  # fmt: skip
        found: dict[str, Any] = json.loads(reply)
        return found

    wait_until(lambda: status("key-ops").get("agents"), 30, "the agent in the status")
    operator, tenant = status("key-ops"), status("key-a")

    assert operator["operator_view"] is True and operator["tenant"] == "ops"
    assert [a["agent_id"] for a in operator["agents"]] == ["page-agent"]
    assert tenant["tenant"] == "tenant-a" and "operator_view" not in tenant
    assert "agents" not in tenant and tenant["agent_count"] == 1
    assert len(operator.get("recent_tasks", [])) <= 5

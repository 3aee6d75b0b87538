"""An agent whose join token the broker refuses stops after a few tries, its last log line
saying why and what to set, instead of retrying forever: the same token cannot succeed."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from gpubroker.gpu_agent.agent import JOIN_REFUSALS
from tests.support.cluster import broker_settings, running_broker

pytestmark = pytest.mark.slow  # a real agent process

EXIT_WITHIN_S = 60.0
"""The agent's start (torch import, warm-up) and one refused hello take a few seconds."""


async def run_agent(address: str, token: str, tmp_path: Path) -> tuple[int, str]:
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpubroker.gpu_agent",
        "--broker",
        address,
        "--agent-id",
        "refused-1",
        "--device",
        "cpu",
        "--slots",
        "1",
        "--metadata-url",
        "off",
        "--model-dir",
        str(tmp_path / "models"),
        env=os.environ | {"GPUBROKER_AGENT_JOIN_TOKEN": token, "GPUBROKER_JOIN_TOKEN": ""},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(agent.communicate(), EXIT_WITHIN_S)
    except TimeoutError:
        agent.kill()
        await agent.wait()
        pytest.fail(f"the refused agent still runs after {EXIT_WITHIN_S:g} s")
    assert agent.returncode is not None
    return agent.returncode, stderr.decode()


async def test_a_wrong_join_token_ends_the_agent_with_one_clear_error(tmp_path: Path) -> None:
    settings = broker_settings(tmp_path, join_token="the-right-token", heartbeat_interval_s=0.3)

    async with running_broker(settings) as broker:
        code, stderr = await run_agent(f"127.0.0.1:{broker.port}", "a-wrong-token", tmp_path)
        joined = broker.registry.get("refused-1")

    assert code == 1
    assert joined is None
    assert "Traceback" not in stderr
    refusals = [line for line in stderr.splitlines() if "refused this agent" in line]
    assert len(refusals) == JOIN_REFUSALS  # one line per refusal, the last one says it stops
    assert " ERROR " in refusals[-1] and refusals[-1].endswith("not retrying")
    assert "UNAUTHENTICATED" in refusals[-1] and "GPUBROKER_AGENT_JOIN_TOKEN" in refusals[-1]
    assert all(" WARNING " in line and "trying again" in line for line in refusals[:-1])

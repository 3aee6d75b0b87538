"""The agent as a process: settings from the environment, command-line flags and signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gpubroker.gpu_agent.__main__ import main
from gpubroker.gpu_agent.config import Backoff, ModelCacheSettings, Settings
from tests.fakes.gateway import TOKEN, WAIT_S, FakeGatewayServer, make_assignment, next_upload
from tests.support.waiting import wait_for

# -- the process: settings, flags and signals -----------------------------------------------------


def test_settings_come_from_gpubroker_agent_variables() -> None:
    settings = Settings.from_env(
        {
            "GPUBROKER_AGENT_BROKER": "broker.internal:443",
            "GPUBROKER_AGENT_ID": "vm-7",
            "GPUBROKER_AGENT_SLOTS": "4",
            "GPUBROKER_AGENT_DEVICE": "cuda",
            "GPUBROKER_AGENT_JOIN_TOKEN": "tok",
            "GPUBROKER_AGENT_TLS": "true",
            "GPUBROKER_AGENT_CA_FILE": "/etc/ca.pem",
            "GPUBROKER_AGENT_RECONNECT_MAX_S": "9",
            "GPUBROKER_AGENT_MODEL_DIR": "/var/cache/models",
            "GPUBROKER_AGENT_MODEL_DISK_BYTES": "1000000",
            "GPUBROKER_AGENT_MODEL_DEVICE_BYTES": "2000",
            "GPUBROKER_AGENT_METADATA_URL": "off",
        }
    )

    assert settings == Settings(
        broker_address="broker.internal:443",
        agent_id="vm-7",
        slots=4,
        device="cuda",
        join_token="tok",
        tls=True,
        ca_file="/etc/ca.pem",
        backoff=Backoff(max_s=9.0),
        models=ModelCacheSettings("/var/cache/models", disk_bytes=1_000_000, device_bytes=2000),
        metadata_url="off",
    )


def test_unset_variables_keep_the_defaults_and_the_id_is_the_hostname_plus_a_suffix() -> None:
    settings = Settings.from_env({"GPUBROKER_JOIN_TOKEN": "shared"})

    assert settings.slots == 2 and settings.device == "auto" and not settings.tls
    assert settings.join_token == "shared"
    assert settings.agent_id.startswith(socket.gethostname() + "-")
    assert Settings.from_env({}).agent_id != settings.agent_id


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"GPUBROKER_AGENT_SLOTS": "two"}, "GPUBROKER_AGENT_SLOTS must be an integer, got 'two'"),
        ({"GPUBROKER_AGENT_SLOTS": "0"}, "slots must be at least 1, got 0"),
        ({"GPUBROKER_AGENT_DEVICE": "tpu"}, "device must be one of auto, cpu, cuda, not 'tpu'"),
        ({"GPUBROKER_AGENT_TLS": "maybe"}, "GPUBROKER_AGENT_TLS must be true or false"),
        ({"GPUBROKER_AGENT_MODEL_DISK_BYTES": "0"}, "model disk_bytes must be at least 1"),
        ({"GPUBROKER_AGENT_MODEL_DEVICE_BYTES": "1.5"}, "MODEL_DEVICE_BYTES must be an integer"),
    ],
)
def test_bad_variables_are_refused_by_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(environ)


def test_flags_override_the_environment_and_absent_flags_do_not() -> None:
    settings = Settings.from_env({"GPUBROKER_AGENT_SLOTS": "4", "GPUBROKER_AGENT_ID": "env-id"})

    overridden = settings.with_overrides(slots=1, agent_id=None, device="cpu")

    assert (overridden.slots, overridden.agent_id, overridden.device) == (1, "env-id", "cpu")


def test_reconnect_delays_double_from_0_1_s_to_a_5_s_cap_with_jitter() -> None:
    backoff = Backoff()
    middle: Callable[[float, float], float] = lambda low, high: (low + high) / 2  # noqa: E731

    delays = [backoff.delay_s(n, middle) for n in range(1, 10)]

    assert delays[:3] == pytest.approx([0.1, 0.2, 0.4])
    assert delays[-1] == pytest.approx(5.0)
    assert backoff.delay_s(1, lambda low, high: low) == pytest.approx(0.08)
    assert backoff.delay_s(50, lambda low, high: high) == pytest.approx(6.0)


def test_the_cli_refuses_a_bad_flag_before_connecting() -> None:
    result = CliRunner().invoke(main, ["--broker", "localhost:1", "--slots", "0"])

    assert result.exit_code == 2
    assert "--slots" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_cli_exits_1_when_cuda_is_asked_for_and_absent() -> None:
    result = CliRunner().invoke(main, ["--broker", "localhost:1", "--device", "cuda"])

    assert result.exit_code == 1
    assert "no CUDA device" in result.output


async def _spawn_agent(port: int, log: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBROKER_")}
    args = ["--broker", f"localhost:{port}", "--slots", "1", "--device", "cpu"]
    args += ["--model-dir", str(log.parent / "models")]
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpubroker.gpu_agent", *args,
            "--agent-id", "cli", "--join-token", TOKEN,
            stdout=out, stderr=out, env=env,
        )  # fmt: skip


@pytest.mark.slow
async def test_sigterm_drains_in_flight_work_then_exits_0(
    broker: FakeGatewayServer, tmp_path: Path
) -> None:
    broker.gateway.submit(
        *make_assignment("t-term", "sleep", [torch.ones(1)], params={"seconds": 0.3})
    )
    process = await _spawn_agent(broker.port, tmp_path / "agent.log")
    await wait_for(lambda: "t-term" in broker.gateway.fetched)

    process.send_signal(signal.SIGTERM)
    upload = await next_upload(broker.gateway)
    code = await asyncio.wait_for(process.wait(), WAIT_S)

    assert upload.header.error_code == "" and upload.header.attempt.task_id == "t-term"
    assert code == 0, (tmp_path / "agent.log").read_text()


@pytest.mark.slow
async def test_a_second_signal_exits_at_once(broker: FakeGatewayServer, tmp_path: Path) -> None:
    broker.gateway.submit(
        *make_assignment("t-long", "sleep", [torch.ones(1)], params={"seconds": 60.0})
    )
    process = await _spawn_agent(broker.port, tmp_path / "agent.log")
    await wait_for(lambda: "t-long" in broker.gateway.fetched)

    process.send_signal(signal.SIGTERM)
    log = tmp_path / "agent.log"
    await wait_for(lambda: "draining" in log.read_text(), WAIT_S, "the agent to start draining")
    process.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(process.wait(), WAIT_S)

    assert code == 128 + signal.SIGINT, (tmp_path / "agent.log").read_text()
    assert broker.gateway.uploads.empty()

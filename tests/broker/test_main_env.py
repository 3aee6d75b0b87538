"""Every option of ``python -m gpubroker.broker`` has a ``GPUBROKER_*`` variable, as the README
says; ``--port-file`` and ``--log-level`` through a real broker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest

from gpubroker.broker.__main__ import main
from tests.support.paths import REPO_ROOT as ROOT
from tests.support.waiting import wait_until


def test_every_option_has_a_gpubroker_variable() -> None:
    # Settings.from_env reads most of them (broker/config.py); the rest are click's envvar.
    read = (ROOT / "broker" / "config.py").read_text() + (
        ROOT / "broker" / "__main__.py"
    ).read_text()
    missing = []
    for param in main.params:
        if not isinstance(param, click.Option) or param.opts[0] == "--help":
            continue
        name = "GPUBROKER_" + param.opts[0].removeprefix("--").replace("-", "_").upper()
        if param.envvar is None and f'"{name}"' not in read and f"{name}_S" not in read:
            missing.append(param.opts[0])

    assert missing == []


@pytest.mark.slow  # a broker process
def test_the_port_file_and_log_level_come_from_the_environment(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    env = os.environ | {
        "GPUBROKER_DATA_DIR": str(tmp_path / "data"),
        "GPUBROKER_LISTEN": "127.0.0.1:0",
        "GPUBROKER_MIGRATE": "1",
        "GPUBROKER_PROVIDER": "none",
        "GPUBROKER_PORT_FILE": str(port_file),
        "GPUBROKER_LOG_LEVEL": "warning",
    }
    broker = subprocess.Popen(
        [sys.executable, "-m", "gpubroker.broker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: port_file.exists() or broker.poll() is not None, 60.0, "the port file")
        port = port_file.read_text().strip() if port_file.exists() else ""
    finally:
        broker.send_signal(signal.SIGTERM)
        _, stderr = broker.communicate(timeout=30)

    assert port.isdigit() and int(port) > 0, stderr
    assert " INFO " not in stderr and "listening" not in stderr

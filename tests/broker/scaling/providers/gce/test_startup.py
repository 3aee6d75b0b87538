"""The startup script's install step, run by bash in a scratch directory: an image that has the
agent installs nothing; any other installs it once."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gpubroker.broker.scaling.providers.gce import GceSettings, GpuOffering
from gpubroker.broker.scaling.providers.gce.startup import AGENT_VENV, startup_script

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

ROOT = str(Path(AGENT_VENV).parent)  # /opt/gpubroker

# Stand-ins for the network: each records its words instead of downloading anything.
FAKES = """\
uv() { echo "uv $*" >> "$CALLS"; if [ "$1" = venv ]; then mkdir -p "${!#}/bin"; fi; }
curl() { echo "curl $*" >> "$CALLS"; }
"""


def install_step(root: Path) -> str:
    """The script's lines up to its systemd part, with ``ROOT`` moved under ``root``."""
    settings = GceSettings(
        project="p", zones=("z",), broker_address="b:1", agent_package="gpubroker==0.1.0"
    )
    script = startup_script(settings, "vm-1", GpuOffering("g2-standard-4", "nvidia-l4"))
    head = script.split("\numask 077\n", 1)[0]
    assert "uv pip install" in head
    return head.replace(ROOT, str(root))


def run_install(tmp_path: Path) -> list[str]:
    calls = tmp_path / "calls"
    subprocess.run(
        ["bash", "-c", FAKES + install_step(tmp_path / "opt")],
        env={"CALLS": str(calls), "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=10,
    )
    return calls.read_text().splitlines() if calls.exists() else []


def test_a_plain_image_installs_the_agent_on_first_boot_only(tmp_path: Path) -> None:
    first = run_install(tmp_path)
    (tmp_path / "calls").unlink()
    again = run_install(tmp_path)

    assert [c.split()[:2] for c in first if c.startswith("uv")] == [["uv", "venv"], ["uv", "pip"]]
    assert again == []
    assert (tmp_path / "opt" / "installed").exists()


def test_an_image_with_the_agent_installs_nothing(tmp_path: Path) -> None:
    agent = tmp_path / "opt" / "venv" / "bin" / "gpubroker-agent"
    agent.parent.mkdir(parents=True)
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)

    calls = run_install(tmp_path)

    assert calls == []
    assert (tmp_path / "opt" / "installed").exists()

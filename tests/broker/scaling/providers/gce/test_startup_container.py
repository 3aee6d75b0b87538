"""``agent_image``: the startup script runs the agent's container instead of installing it.

The whole script runs in bash, with ``/etc`` moved into a scratch directory and stand-ins for
docker, gcloud, curl (the metadata server) and systemctl that record their words.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gpubroker.broker.scaling.providers.gce import GceSettings, GpuOffering
from gpubroker.broker.scaling.providers.gce.startup import startup_script
from gpubroker.gpu_agent.__main__ import main as agent_main
from tests.fakes.compute import FakeCompute
from tests.support.gce import make_settings

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

IMAGE = "us-central1-docker.pkg.dev/my-project/gpubroker/agent:0.1.0"
L4 = GpuOffering("g2-standard-4", "nvidia-l4")
CPU = GpuOffering("n2-standard-2", accelerator_count=0)
TOKEN = "join-token-from-metadata"

FAKES = f"""\
docker() {{ echo "docker $*" >> "$CALLS"; }}
gcloud() {{ echo "gcloud $*" >> "$CALLS"; }}
systemctl() {{ echo "systemctl $*" >> "$CALLS"; }}
curl() {{ echo "curl $*" >> "$CALLS"; printf '%s' {TOKEN}; }}
"""


def settings(**overrides: Any) -> GceSettings:
    values: dict[str, Any] = {
        "project": "p",
        "zones": ("z",),
        "broker_address": "10.10.0.10:50051",
        "agent_image": IMAGE,
        "join_token": "the-brokers-token",
        "agent_env": {"GPUBROKER_AGENT_TLS": "1", "GPUBROKER_AGENT_SLOTS": "2"},
    }
    return GceSettings(**(values | overrides))


def run(tmp_path: Path, script: str, *, fakes: str = FAKES) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` with /etc under ``tmp_path``; the stand-ins' calls go to tmp_path/calls."""
    (tmp_path / "etc" / "systemd" / "system").mkdir(parents=True)
    moved = script.replace("/etc/", f"{tmp_path}/etc/")
    return subprocess.run(
        ["bash", "-c", fakes + moved],
        env={"CALLS": str(tmp_path / "calls"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=10,
    )


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def unit_value(unit: str, key: str) -> str:
    (value,) = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(f"{key}=")]
    return value


def test_a_gpu_vm_runs_the_image_with_the_gpu_the_broker_flags_and_the_token(
    tmp_path: Path,
) -> None:
    done = run(tmp_path, startup_script(settings(), "gpubroker-prod-1a2b", L4))

    assert done.returncode == 0, done.stderr
    unit = (tmp_path / "etc" / "systemd" / "system" / "gpubroker-agent.service").read_text()
    words = shlex.split(unit_value(unit, "ExecStart"))
    image_at = words.index(IMAGE)
    assert words[:3] == ["docker", "run", "--rm"]
    assert "--gpus" in words[:image_at] and words[words.index("--gpus") + 1] == "all"
    assert words[words.index("--env-file") + 1] == f"{tmp_path}/etc/gpubroker-agent.env"
    agent_args = words[image_at + 1 :]
    assert agent_args == [
        "--broker",
        "10.10.0.10:50051",
        "--agent-id",
        "gpubroker-prod-1a2b",
        "--device",
        "cuda",
    ]
    known = {option for p in agent_main.params for option in p.opts}
    assert set(agent_args[::2]) <= known
    assert "Requires=docker.service" in unit
    # docker's --env-file reads lines literally: no quotes around the values.
    env = (tmp_path / "etc" / "gpubroker-agent.env").read_text().splitlines()
    assert env == [
        "GPUBROKER_AGENT_TLS=1",
        "GPUBROKER_AGENT_SLOTS=2",
        f"GPUBROKER_AGENT_JOIN_TOKEN={TOKEN}",
    ]
    assert (tmp_path / "etc" / "gpubroker-agent.env").stat().st_mode & 0o077 == 0
    made = calls(tmp_path)
    assert "gcloud auth configure-docker us-central1-docker.pkg.dev --quiet" in made
    assert [c for c in made if c.startswith("systemctl")] == [
        "systemctl daemon-reload",
        "systemctl enable gpubroker-agent.service",
        "systemctl restart gpubroker-agent.service",
    ]
    assert not [c for c in made if c.startswith(("uv", "pip"))]
    assert "the-brokers-token" not in startup_script(settings(), "vm", L4)


def test_a_cpu_vm_runs_the_image_without_a_gpu(tmp_path: Path) -> None:
    done = run(tmp_path, startup_script(settings(), "vm-cpu", CPU))

    assert done.returncode == 0, done.stderr
    unit = (tmp_path / "etc" / "systemd" / "system" / "gpubroker-agent.service").read_text()
    words = shlex.split(unit_value(unit, "ExecStart"))
    assert "--gpus" not in words
    assert words[-2:] == ["--device", "cpu"]


def test_an_image_outside_googles_registries_is_pulled_without_gcloud(tmp_path: Path) -> None:
    script = startup_script(settings(agent_image="ghcr.io/example/agent:1"), "vm", L4)

    done = run(tmp_path, script)

    assert done.returncode == 0, done.stderr
    assert not [c for c in calls(tmp_path) if c.startswith("gcloud")]


def test_a_boot_image_without_docker_stops_the_script_saying_why(tmp_path: Path) -> None:
    no_docker = FAKES.replace('docker() { echo "docker $*" >> "$CALLS"; }\n', "")

    done = run(tmp_path, startup_script(settings(), "vm", L4), fakes=no_docker)

    assert done.returncode == 1
    assert "agent_image needs Docker" in done.stderr
    assert not (tmp_path / "etc" / "systemd" / "system" / "gpubroker-agent.service").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"agent_package": "gpubroker==0.1.0"}, "leave out agent_package"),
        ({"agent_extra_packages": ["w==1"]}, "leave out agent_package"),
        ({"agent_image": "reg.example.com/agent:1; rm -rf /"}, "not an image reference"),
        ({"agent_image": "Upper/Case"}, "not an image reference"),
    ],
    ids=["with-a-package", "with-extra-packages", "shell-words", "uppercase-repository"],
)
def test_settings_refuse_an_image_with_packages_or_that_is_no_reference(
    fake: FakeCompute, overrides: dict[str, Any], message: str
) -> None:
    values = {"agent_image": IMAGE, "agent_package": ""} | overrides

    with pytest.raises(ValueError, match=message):
        make_settings(fake, **values)


def test_settings_take_an_image_by_digest_without_a_package(fake: FakeCompute) -> None:
    image = f"{IMAGE.rsplit(':', 1)[0]}@sha256:{'a' * 64}"

    loaded = make_settings(fake, agent_image=image, agent_package="")

    assert (loaded.agent_image, loaded.agent_package) == (image, "")

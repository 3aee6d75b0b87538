"""The container images and the local stack: what can be checked without building an image.

Each Dockerfile must install through its script in deploy/docker/ (which .ci/run runs in a fresh
virtual environment), and every file the compose stack mounts or builds from must exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT as ROOT

DOCKER = ROOT / "deploy" / "docker"
COMPOSE = ROOT / "deploy" / "compose.yaml"
IMAGES = {"broker": "gpubroker.broker", "agent": "gpubroker.gpu_agent"}
"""Image name -> the module its entry point runs."""


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    arguments: str


def instructions(dockerfile: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, comments dropped and continuation lines joined."""
    found: list[Instruction] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        found.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{dockerfile}: the last instruction ends with a backslash"
    return found


def copied(dockerfile: Path) -> dict[str, str]:
    """Each file the Dockerfile copies from the build context -> where it lands in the image."""
    placed: dict[str, str] = {}
    for instruction in instructions(dockerfile):
        if instruction.keyword != "COPY":
            continue
        words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
        *sources, destination = words
        for source in sources:
            assert (ROOT / source).is_file(), f"{dockerfile.name} copies {source}: no such file"
            target = destination.rstrip("/") + "/" + Path(source).name
            placed[source] = target if destination.endswith("/") else destination
    return placed


def run_words(dockerfile: Path) -> list[list[str]]:
    """The shell words of each RUN instruction (mount options dropped)."""
    return [
        [w for w in shlex.split(i.arguments) if not w.startswith("--mount")]
        for i in instructions(dockerfile)
        if i.keyword == "RUN"
    ]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_dockerfile_installs_with_its_script(image: str) -> None:
    dockerfile = DOCKER / f"{image}.Dockerfile"
    script = f"deploy/docker/install-{image}.sh"

    placed = copied(dockerfile)
    runs = run_words(dockerfile)

    assert script in placed and "deploy/docker/install-common.sh" in placed
    # The script sources its helper from its own directory.
    assert Path(placed[script]).parent == Path(placed["deploy/docker/install-common.sh"]).parent
    installs = [words for words in runs if placed[script] in words]
    assert len(installs) == 1, f"{dockerfile.name} must RUN {placed[script]} once"
    arguments = installs[0][installs[0].index(placed[script]) + 1 :]
    assert arguments[:1] == ["/opt/gpubroker/venv"]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_image_runs_its_process_from_the_installed_venv(image: str) -> None:
    (entrypoint,) = [
        i for i in instructions(DOCKER / f"{image}.Dockerfile") if i.keyword == "ENTRYPOINT"
    ]

    words = json.loads(entrypoint.arguments)  # the exec form: no shell between

    assert words == ["/opt/gpubroker/venv/bin/python", "-m", IMAGES[image]]
    assert importlib.util.find_spec(IMAGES[image]) is not None


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_the_install_scripts_parse_and_are_executable(image: str) -> None:
    script = DOCKER / f"install-{image}.sh"

    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
    subprocess.run(["bash", "-n", str(DOCKER / "install-common.sh")], check=True, timeout=10)


def test_an_install_refuses_an_existing_directory_and_an_old_python(tmp_path: Path) -> None:
    script = str(DOCKER / "install-agent.sh")
    old_python = tmp_path / "python2"
    old_python.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Python 3.10.0'\nexit 1\n")
    old_python.chmod(0o755)

    existing = subprocess.run(
        ["bash", script, str(tmp_path)], capture_output=True, text=True, timeout=30
    )
    too_old = subprocess.run(
        ["bash", script, str(tmp_path / "venv")],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHON": str(old_python)},
    )

    assert existing.returncode != 0 and "exists" in existing.stderr
    assert too_old.returncode != 0 and "needs Python 3.11" in too_old.stderr
    assert not (tmp_path / "venv").exists()


def test_ci_runs_both_install_scripts() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    loop = re.search(r"for image in ([a-z ]+); do", run)

    assert loop is not None and set(loop.group(1).split()) == set(IMAGES)
    assert "deploy/docker/install-$image.sh" in run
    assert re.search(r"^check_image_installs$", run, re.MULTILINE)


def compose_references() -> list[Path]:
    """Files deploy/compose.yaml builds from or mounts, resolved as compose does."""
    text = COMPOSE.read_text()
    base = COMPOSE.parent
    found: list[Path] = []
    contexts = re.findall(r"^\s+context:\s*(\S+)\s*$", text, re.MULTILINE)
    dockerfiles = re.findall(r"^\s+dockerfile:\s*(\S+)\s*$", text, re.MULTILINE)
    assert len(contexts) == len(dockerfiles) > 0
    for context, dockerfile in zip(contexts, dockerfiles, strict=True):
        found.append((base / context / dockerfile).resolve())
    for source in re.findall(r"^\s+-\s+(\.\.?/[^:\s]+):", text, re.MULTILINE):
        found.append((base / source).resolve())
    return found


def test_every_file_the_compose_stack_uses_exists() -> None:
    references = compose_references()
    names = {p.relative_to(ROOT).as_posix() for p in references}

    assert {
        "deploy/docker/broker.Dockerfile",
        "deploy/docker/agent.Dockerfile",
        "deploy/prometheus.yml",
        "deploy/grafana/gpubroker.json",
    } <= names
    assert [p for p in references if not p.is_file()] == []


def test_the_compose_stack_keeps_secrets_out_and_ports_on_loopback() -> None:
    text = COMPOSE.read_text()
    published = re.findall(r"^\s+-\s+\"?([0-9.:]+):\d+\"?\s*$", text, re.MULTILINE)

    assert "GPUBROKER_JOIN_TOKEN: ${GPUBROKER_JOIN_TOKEN:?" in text
    assert published and all(p.startswith("127.0.0.1:") for p in published)


SERVICE = ROOT / "deploy" / "gpubroker.service"


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """Key -> values of a systemd unit file (every section)."""
    values: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_the_systemd_unit_is_sandboxed_and_runs_the_broker() -> None:
    unit = unit_settings(SERVICE)

    (exec_start,) = unit["ExecStart"]
    assert exec_start.split()[1:3] == ["-m", "gpubroker.broker"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "User": "gpubroker",
    }.items():
        assert unit.get(key) == [value], key
    assert "/var/lib/gpubroker" in unit["ReadWritePaths"][0].split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_every_line_of_the_unit(tmp_path: Path) -> None:
    # verify wants ExecStart's program to exist: this interpreter stands in for the venv's.
    unit = tmp_path / SERVICE.name
    unit.write_text(SERVICE.read_text().replace("/opt/gpubroker/venv/bin/python", sys.executable))

    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )

    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_deploy_guide_uses_the_shipped_unit() -> None:
    guide = (ROOT / "docs" / "deploy.md").read_text()

    assert "deploy/gpubroker.service" in guide
    # No inline copy to drift from the file: the guide's only unit is the agents' on GCE.
    assert "ExecStart=/opt/gpubroker/venv/bin/python -m gpubroker.broker" not in guide

"""The ``startup-script`` of an agent VM: install the agent, then run it under systemd.

On first boot the script installs the agent package and any extra packages (an operator's
workloads), in one ``uv pip install``, into a Python of its own (the image's may be older), at
``AGENT_VENV``. An image that already has the agent there (``AGENT_VENV/bin/gpubroker-agent``;
docs/deploy.md, "Fast boots: a prebuilt image") installs nothing: its boots skip the download
and the resolve entirely. On every boot it writes a systemd service that runs
``python -m gpubroker.gpu_agent`` and restarts it on failure. The agent's id is the VM's name.
The join token travels in its own metadata key (``JOIN_TOKEN_METADATA_KEY``) and reaches the
agent through a root-only environment file; it appears in neither the script nor any log.

With ``agent_image`` set the script installs nothing: the systemd service runs that container
image instead (``docker run --gpus all --network host``), with the same environment file and
agent flags, and the model cache in a Docker volume. The boot image must have Docker and, for a
GPU, the NVIDIA Container Toolkit. An image in Artifact Registry or Container Registry is
pulled as the VM's service account, through ``gcloud auth configure-docker``.
"""

from __future__ import annotations

import shlex

from gpubroker.broker.scaling.providers.gce.settings import GceSettings, GpuOffering

__all__ = ["AGENT_CONTAINER", "AGENT_VENV", "JOIN_TOKEN_METADATA_KEY", "startup_script"]

AGENT_VENV = "/opt/gpubroker/venv"
"""Where the agent is installed on the VM, or found preinstalled in a prebuilt image."""

JOIN_TOKEN_METADATA_KEY = "gpubroker-join-token"
"""Instance metadata key the startup script reads the join token from."""

AGENT_CONTAINER = "gpubroker-agent"
"""Name of the agent's container (``agent_image``); its model volume is ``<name>-models``."""

_GOOGLE_REGISTRIES = ("-docker.pkg.dev", "gcr.io")
"""Registry hosts whose images the VM pulls with its service account."""

_HEAD = """\
#!/bin/bash
# Runs a gpubroker agent on this VM; written by the broker's gce provider. Runs on every boot.
set -euo pipefail
export HOME=/root
"""

_INSTALL = """\
export UV_PYTHON_INSTALL_DIR=/opt/gpubroker/python
agent={venv}
if [ ! -f /opt/gpubroker/installed ]; then
  if command -v "$agent/bin/gpubroker-agent" >/dev/null; then
    echo "gpubroker: the image has the agent in $agent; installing nothing"
  else
    if ! command -v uv >/dev/null; then
      curl -LsSf https://astral.sh/uv/install.sh \\
        | env UV_INSTALL_DIR=/usr/local/bin INSTALLER_NO_MODIFY_PATH=1 sh
    fi
    uv venv --python {python} "$agent"
    uv pip install --python "$agent/bin/python" {packages}
  fi
  touch /opt/gpubroker/installed
fi
"""

_DOCKER = """\
if ! command -v docker >/dev/null; then
  echo "gpubroker: agent_image needs Docker and the NVIDIA Container Toolkit on the boot image" >&2
  exit 1
fi
{login}"""

_LOGIN = """\
# Pulls from Google's registries as the VM's service account.
if command -v gcloud >/dev/null; then
  gcloud auth configure-docker {registry} --quiet
else
  echo "gpubroker: no gcloud to log docker in to {registry}; pulling anonymously" >&2
fi
"""

_ENV = """
umask 077
cat > /etc/gpubroker-agent.env <<'EOF'
{env}EOF
{token}umask 022
"""

_TOKEN_LINES = f"""\
# The join token comes from instance metadata, so it is in neither this script nor its log.
token="$(curl -sSf -H 'Metadata-Flavor: Google' \\
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/{JOIN_TOKEN_METADATA_KEY})"
printf 'GPUBROKER_AGENT_JOIN_TOKEN=%s\\n' "$token" >> /etc/gpubroker-agent.env
unset token
"""

_UNIT = """\
cat > /etc/systemd/system/gpubroker-agent.service <<'EOF'
[Unit]
Description=gpubroker GPU agent
Wants=network-online.target
After=network-online.target{after}
StartLimitIntervalSec=0

[Service]
{service}Restart=always
RestartSec=5
TimeoutStopSec={stop_s}

[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable gpubroker-agent.service
systemctl restart gpubroker-agent.service
"""


def startup_script(settings: GceSettings, name: str, offering: GpuOffering) -> str:
    """The bash ``startup-script``: installs the agent (or, with ``agent_image``, pulls its
    container) and runs it under systemd."""
    device = "cuda" if offering.has_gpu else "cpu"
    flags = f"--broker {settings.broker_address} --agent-id {name} --device {device}"
    token = _TOKEN_LINES if settings.join_token else ""
    if settings.agent_image:
        return _container_script(settings, offering, flags, token)
    env = "".join(
        f'{key}="{_systemd_quoted(value)}"\n' for key, value in settings.agent_env.items()
    )
    service = (
        "EnvironmentFile=/etc/gpubroker-agent.env\n"
        f"ExecStart={AGENT_VENV}/bin/python -m gpubroker.gpu_agent {flags}\n"
    )
    install = _INSTALL.format(
        venv=AGENT_VENV,
        python=shlex.quote(settings.agent_python),
        packages=" ".join(
            shlex.quote(p) for p in (settings.agent_package, *settings.agent_extra_packages)
        ),
    )
    return (
        _HEAD
        + install
        + _ENV.format(env=env, token=token)
        + _UNIT.format(after="", service=service, stop_s=25)
    )


def _container_script(settings: GceSettings, offering: GpuOffering, flags: str, token: str) -> str:
    # docker's --env-file takes each line literally, quotes included: values go in bare (the
    # settings allow single-line values only).
    env = "".join(f"{key}={value}\n" for key, value in settings.agent_env.items())
    gpus = "--gpus all " if offering.has_gpu else ""
    run = (
        f"docker run --rm --name {AGENT_CONTAINER} {gpus}--network host "
        f"--env-file /etc/gpubroker-agent.env -v {AGENT_CONTAINER}-models:/var/lib/gpubroker "
        f"{settings.agent_image} {flags}"
    )
    # The image is pulled on the first start; docker's own unit must be up first.
    service = (
        "Environment=HOME=/root\n"
        f"ExecStartPre=-docker rm -f {AGENT_CONTAINER}\n"
        f"ExecStart={run}\n"
        f"ExecStop=docker stop -t 25 {AGENT_CONTAINER}\n"
    )
    return (
        _HEAD
        + _DOCKER.format(login=_login(settings.agent_image))
        + _ENV.format(env=env, token=token)
        + _UNIT.format(after=" docker.service\nRequires=docker.service", service=service, stop_s=30)
    )


def _login(image: str) -> str:
    """``gcloud auth configure-docker`` for an image in Google's registries, else nothing."""
    registry = image.split("/", 1)[0]
    if "/" in image and registry.endswith(_GOOGLE_REGISTRIES):
        return _LOGIN.format(registry=shlex.quote(registry))
    return ""


def _systemd_quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')

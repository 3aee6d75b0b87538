"""The ``startup-script`` of an agent VM: install the agent, then run it under systemd.

On first boot the script installs the agent package and any extra packages (an operator's
workloads), in one ``uv pip install``, into a Python of its own (the image's may be older), at
``AGENT_VENV``. An image that already has the agent there (``AGENT_VENV/bin/gpubroker-agent``;
docs/deploy.md, "Fast boots: a prebuilt image") installs nothing: its boots skip the download
and the resolve entirely. On every boot it writes a systemd service that runs
``python -m gpubroker.gpu_agent`` and restarts it on failure. The agent's id is the VM's name.
The join token travels in its own metadata key (``JOIN_TOKEN_METADATA_KEY``) and reaches the
agent through a root-only environment file; it appears in neither the script nor any log.
"""

from __future__ import annotations

import shlex

from gpubroker.broker.scaling.providers.gce.settings import GceSettings, GpuOffering

__all__ = ["AGENT_VENV", "JOIN_TOKEN_METADATA_KEY", "startup_script"]

AGENT_VENV = "/opt/gpubroker/venv"
"""Where the agent is installed on the VM, or found preinstalled in a prebuilt image."""

JOIN_TOKEN_METADATA_KEY = "gpubroker-join-token"
"""Instance metadata key the startup script reads the join token from."""

_SCRIPT = """\
#!/bin/bash
# Runs a gpubroker agent on this VM; written by the broker's gce provider. Runs on every boot.
set -euo pipefail
export HOME=/root
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

umask 077
cat > /etc/gpubroker-agent.env <<'EOF'
{env}EOF
{token}umask 022
cat > /etc/systemd/system/gpubroker-agent.service <<'EOF'
[Unit]
Description=gpubroker GPU agent
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
EnvironmentFile=/etc/gpubroker-agent.env
ExecStart={exec_start}
Restart=always
RestartSec=5
TimeoutStopSec=25

[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable gpubroker-agent.service
systemctl restart gpubroker-agent.service
"""

_TOKEN_LINES = f"""\
# The join token comes from instance metadata, so it is in neither this script nor its log.
token="$(curl -sSf -H 'Metadata-Flavor: Google' \\
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/{JOIN_TOKEN_METADATA_KEY})"
printf 'GPUBROKER_AGENT_JOIN_TOKEN=%s\\n' "$token" >> /etc/gpubroker-agent.env
unset token
"""


def startup_script(settings: GceSettings, name: str, offering: GpuOffering) -> str:
    """The bash ``startup-script`` that installs the agent and runs it under systemd."""
    device = "cuda" if offering.has_gpu else "cpu"
    exec_start = (
        f"{AGENT_VENV}/bin/python -m gpubroker.gpu_agent --broker {settings.broker_address} "
        f"--agent-id {name} --device {device}"
    )
    env = "".join(
        f'{key}="{_systemd_quoted(value)}"\n' for key, value in settings.agent_env.items()
    )
    return _SCRIPT.format(
        venv=AGENT_VENV,
        python=shlex.quote(settings.agent_python),
        packages=" ".join(
            shlex.quote(p) for p in (settings.agent_package, *settings.agent_extra_packages)
        ),
        env=env,
        token=_TOKEN_LINES if settings.join_token else "",
        exec_start=exec_start,
    )


def _systemd_quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')

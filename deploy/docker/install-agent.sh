#!/usr/bin/env bash
# Installs the GPU agent into a fresh virtual environment and checks that its commands start.
# The agent image (agent.Dockerfile) runs it at build time, and .ci/run runs it in a scratch
# directory, so the image's install steps are tested where no image can be built.
#
#   install-agent.sh VENV [SOURCE]
#
# VENV is created (it must not exist); SOURCE is the project: a source tree (default: this
# script's repository) or a wheel. Environment:
#   PYTHON                 interpreter that makes the venv (default python3; 3.11 or later)
#   TORCH_INDEX_URL        index torch is installed from first: the image takes a CUDA build
#                          matching its CUDA base (agent.Dockerfile); empty: torch comes with
#                          the package, as pip resolves it (CI: the local CPU wheel)
#   EXTRAS                 the package's extras (default agent)
#   EXTRA_PACKAGES         more requirements installed with it, space-separated: your own
#                          workload packages (wheel URLs or pinned requirements)
#   PIP_CONSTRAINT         read by pip itself; CI sets it to constraints.txt
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/docker/install-common.sh
. "$here/install-common.sh"

venv="${1:?usage: install-agent.sh VENV [SOURCE]}"
source_dir="${2:-$(cd "$here/../.." && pwd)}"

make_venv "$venv"
install_torch "$venv"
# shellcheck disable=SC2086  # EXTRA_PACKAGES is a list of words
install_package "$venv" "$source_dir" "${EXTRAS-agent}" ${EXTRA_PACKAGES:-}
check_modules "$venv" gpubroker.gpu_agent
check_scripts "$venv" gpubroker-agent
echo "install-agent: the agent is installed in $venv"

#!/usr/bin/env bash
# Installs the broker into a fresh virtual environment and checks that its commands start.
# The broker image (broker.Dockerfile) runs it at build time, and .ci/run runs it in a scratch
# directory, so the image's install steps are tested where no image can be built.
#
#   install-broker.sh VENV [SOURCE]
#
# VENV is created (it must not exist); SOURCE is the project: a source tree (default: this
# script's repository) or a wheel. Environment:
#   PYTHON           interpreter that makes the venv (default python3; 3.11 or later)
#   TORCH_INDEX_URL  index torch is installed from first (the image: the CPU wheels, since the
#                    broker never imports torch); empty: torch comes with the package, as pip
#                    resolves it (CI: the local CPU wheel, through PIP_CONSTRAINT)
#   EXTRAS           the package's extras (default gce,postgres: the broker, both providers,
#                    SQLite and PostgreSQL)
#   PIP_CONSTRAINT   read by pip itself; CI sets it to constraints.txt
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/docker/install-common.sh
. "$here/install-common.sh"

venv="${1:?usage: install-broker.sh VENV [SOURCE]}"
source_dir="${2:-$(cd "$here/../.." && pwd)}"

make_venv "$venv"
install_torch "$venv"
install_package "$venv" "$source_dir" "${EXTRAS-gce,postgres}"
check_modules "$venv" gpubroker.broker gpubroker.broker.admin gpubroker.broker.certs gpubroker.billing
check_scripts "$venv"
# The schema's migrations load from the installed package, wherever the broker is started.
scratch="$(mktemp -d)"
(cd "$scratch" && GPUBROKER_DATABASE_URL="sqlite:///$scratch/check.db" \
  "$venv/bin/python" -m gpubroker.billing migrate >/dev/null 2>&1) || {
  echo "install: python -m gpubroker.billing migrate failed on a new SQLite database" >&2
  rm -rf "$scratch"
  exit 1
}
rm -rf "$scratch"
echo "install-broker: the broker is installed in $venv"

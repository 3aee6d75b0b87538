# Steps shared by install-broker.sh and install-agent.sh (sourced, not run).

# make_venv VENV: a new virtual environment with PYTHON (3.11 or later).
make_venv() {
  local python="${PYTHON:-python3}"
  if [ -e "$1" ]; then
    echo "install: $1 exists; give a path for a new virtual environment" >&2
    return 1
  fi
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "install: $python is $("$python" --version 2>&1); gpubroker needs Python 3.11 or later" >&2
    return 1
  }
  "$python" -m venv "$1"
}

# install_torch VENV: torch from TORCH_INDEX_URL, when set, before the package asks for it.
install_torch() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$1/bin/python" -m pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" \
      "torch${TORCH_VERSION:+==$TORCH_VERSION}"
  fi
}

# install_package VENV SOURCE EXTRAS [REQUIREMENT...]: the project with its extras, and more.
install_package() {
  local venv="$1" source="$2" extras="$3"
  shift 3
  local requirement="$source"
  if [ -n "$extras" ]; then
    requirement="gpubroker[$extras] @ $(_as_url "$source")"
  fi
  "$venv/bin/python" -m pip install --no-cache-dir "$requirement" "$@"
}

_as_url() {
  case "$1" in
    *://*) printf '%s' "$1" ;;
    /*) printf 'file://%s' "$1" ;;
    *) printf 'file://%s/%s' "$PWD" "$1" ;;
  esac
}

# check_modules VENV MODULE...: every `python -m MODULE --help` answers, so a missing
# dependency fails the install rather than the first start.
check_modules() {
  local venv="$1" module
  shift
  for module in "$@"; do
    "$venv/bin/python" -m "$module" --help >/dev/null || {
      echo "install: python -m $module --help failed" >&2
      return 1
    }
  done
}

# check_scripts VENV [SCRIPT...]: each console script answers --help; with no names, every
# console script of the gpubroker distribution.
check_scripts() {
  local venv="$1" script
  shift
  local scripts=("$@")
  if [ "${#scripts[@]}" -eq 0 ]; then
    read -r -a scripts < <("$venv/bin/python" -c '
from importlib.metadata import distribution
print(" ".join(e.name for e in distribution("gpubroker").entry_points if e.group == "console_scripts"))
')
  fi
  for script in "${scripts[@]}"; do
    "$venv/bin/$script" --help >/dev/null || {
      echo "install: $script --help failed" >&2
      return 1
    }
  done
}

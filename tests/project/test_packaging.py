"""One namespace: what the wheel installs, and what each process loads."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT as ROOT


def _loaded_after(statement: str) -> set[str]:
    script = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/"
    )
    return set(done.stdout.split())


def test_the_broker_loads_neither_the_client_sdk_nor_numpy_nor_torch() -> None:
    loaded = _loaded_after("import gpubroker.broker.server, gpubroker.broker.__main__")

    assert "gpubroker.broker.server" in loaded
    assert not {m for m in loaded if m.startswith("gpubroker.client")}
    assert "numpy" not in loaded
    assert "torch" not in loaded


def test_the_client_loads_nothing_of_the_broker_agent_or_billing() -> None:
    loaded = _loaded_after("from gpubroker import Client, AsyncClient")

    assert "gpubroker.client" in loaded
    assert not {m for m in loaded if m.startswith(("gpubroker.broker", "gpubroker.gpu_agent"))}
    assert not {m for m in loaded if m.startswith(("gpubroker.billing", "sqlalchemy"))}


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gpubroker-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}

    assert {t for t in tops if not t.endswith(".dist-info")} == {"gpubroker"}
    for module in ("client/_sync.py", "broker/storage/store.py", "protos/broker_pb2.py"):
        assert f"gpubroker/{module}" in names
    assert "gpubroker/billing/migrations/versions/0001_initial_schema.py" in names
    assert "gpubroker/billing/prices.toml" in names
    assert _plain_requirements(zipfile.ZipFile(wheel)) == {
        "grpcio",
        "protobuf",
        "torch",
        "numpy",
        "crc32c",
        "safetensors",
    }


def _plain_requirements(wheel: zipfile.ZipFile) -> set[str]:
    """The distributions a plain ``pip install`` of the wheel pulls in (no extra named)."""
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    found = set()
    for line in wheel.read(metadata).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            requirement = line.removeprefix("Requires-Dist:").strip()
            found.add(re.split(r"[\s<>=!~\[;(]", requirement, maxsplit=1)[0])
    return found

"""The client commands of ``gpubroker`` as separate processes against a real broker and agent:
``run`` on ``.npy`` and ``.safetensors`` files, ``tasks``, ``models`` and ``status``, their
``--json`` output parsed, and their exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from gpubroker.cli.exits import ExitCode
from tests.support.cluster import AgentProcess, BrokerProcess

pytestmark = pytest.mark.slow  # broker, agent and CLI processes

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b", "key-op": "ops:operator"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A broker with one CPU agent."""
    root = tmp_path_factory.mktemp("cli-cluster")
    broker = BrokerProcess(root, api_keys=KEYS).start()
    agent = AgentProcess(root, broker.address, "cli-agent", slots=2).start()
    try:
        yield broker
    finally:
        agent.stop()
        broker.stop()


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A broker with no agent: its tasks stay queued."""
    root = tmp_path_factory.mktemp("cli-idle")
    broker = BrokerProcess(root, api_keys=KEYS).start()
    try:
        yield broker
    finally:
        broker.stop()


def gpubroker(
    broker: BrokerProcess, *args: str, key: str = "key-a", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m gpubroker.cli`` with the broker and key in its environment."""
    env = {**os.environ, "GPUBROKER_ADDRESS": broker.address, "GPUBROKER_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "gpubroker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def ok_json(done: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a command printed, once it succeeded."""
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout)


def test_run_adds_two_npy_files_into_an_npy_file(cluster: BrokerProcess, tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.full((3, 4), 0.5, dtype=np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)

    done = gpubroker(
        cluster, "run", "add", "a.npy", "b.npy", "-o", "sum.npy", "--json", cwd=tmp_path
    )

    report = ok_json(done)
    np.testing.assert_array_equal(np.load(tmp_path / "sum.npy"), a + b)
    assert report["state"] == "SUCCEEDED"
    assert report["outputs"] == [{"dtype": "float32", "shape": [3, 4]}]
    shown = ok_json(gpubroker(cluster, "tasks", "show", report["task_id"], "--json"))
    assert shown["task_id"] == report["task_id"] and shown["workload"] == "add"


def test_run_round_trips_a_safetensors_file_in_name_order(
    cluster: BrokerProcess, tmp_path: Path
) -> None:
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "x10": np.arange(3, dtype=np.int64),
        "x2": np.ones((2, 2), dtype=np.float64),
        "x1": np.array([1.5], dtype=np.float32),
    }
    save_file(tensors, str(tmp_path / "in.safetensors"))

    done = gpubroker(
        cluster, "run", "echo", "in.safetensors", "-o", "out.safetensors", cwd=tmp_path
    )

    assert done.returncode == 0, done.stderr
    back = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(back) == ["output_0", "output_1", "output_2"]
    for i, name in enumerate(["x1", "x2", "x10"]):  # natural order of the input names
        np.testing.assert_array_equal(back[f"output_{i}"], tensors[name])


def test_run_keeps_bfloat16_through_safetensors(cluster: BrokerProcess, tmp_path: Path) -> None:
    x = torch.linspace(-2, 2, 16, dtype=torch.bfloat16)
    save_torch({"x": x}, str(tmp_path / "x.safetensors"))

    done = gpubroker(cluster, "run", "echo", "x.safetensors", "-o", "y.safetensors", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert torch.equal(load_torch(str(tmp_path / "y.safetensors"))["output_0"], x)


def test_run_with_progress_draws_bars_for_both_directions(
    cluster: BrokerProcess, tmp_path: Path
) -> None:
    np.save(tmp_path / "big.npy", np.ones(1 << 19, dtype=np.float32))  # 2 MiB

    done = gpubroker(
        cluster, "run", "echo", "big.npy", "-o", "back.npy", "--progress", cwd=tmp_path
    )

    assert done.returncode == 0, done.stderr
    assert "upload" in done.stderr and "download" in done.stderr
    assert "2.0 MiB" in done.stderr


def test_a_failed_task_exits_1_in_one_line(cluster: BrokerProcess, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((2, 3), dtype=np.float32))
    np.save(tmp_path / "b.npy", np.ones((4, 5), dtype=np.float32))

    done = gpubroker(cluster, "run", "matmul", "a.npy", "b.npy", "-o", "c.npy", cwd=tmp_path)

    assert done.returncode == ExitCode.FAILED
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "matmul" in errors[0], done.stderr
    assert not (tmp_path / "c.npy").exists()


def test_several_outputs_need_a_safetensors_file_or_one_npy_each(
    cluster: BrokerProcess, tmp_path: Path
) -> None:
    np.save(tmp_path / "a.npy", np.ones(3, dtype=np.float32))

    one = gpubroker(cluster, "run", "echo", "a.npy", "a.npy", "-o", "o.npy", cwd=tmp_path)
    two = gpubroker(
        cluster, "run", "echo", "a.npy", "a.npy", "-o", "p.npy", "-o", "q.npy", cwd=tmp_path
    )

    assert one.returncode == ExitCode.FAILED and "2 outputs" in one.stderr
    assert two.returncode == 0, two.stderr
    assert np.load(tmp_path / "q.npy").tolist() == [1.0, 1.0, 1.0]


def test_tasks_list_shows_the_callers_tasks_only(cluster: BrokerProcess, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones(2, dtype=np.float32))
    mine = ok_json(
        gpubroker(cluster, "run", "echo", "a.npy", "-o", "b.npy", "--json", cwd=tmp_path)
    )

    listed = ok_json(gpubroker(cluster, "tasks", "list", "--json"))
    succeeded = ok_json(gpubroker(cluster, "tasks", "list", "--state", "succeeded", "--json"))
    others = ok_json(gpubroker(cluster, "tasks", "list", "--json", key="key-b"))

    assert mine["task_id"] in {t["task_id"] for t in listed}
    assert {t["tenant"] for t in listed} == {"tenant-a"}
    assert {t["state"] for t in succeeded} == {"SUCCEEDED"}
    assert mine["task_id"] not in {t["task_id"] for t in others}
    table = gpubroker(cluster, "tasks", "list")
    assert table.returncode == 0 and mine["task_id"] in table.stdout


def test_tasks_wait_on_a_finished_task_exits_0(cluster: BrokerProcess, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones(2, dtype=np.float32))
    task = ok_json(
        gpubroker(cluster, "run", "echo", "a.npy", "-o", "b.npy", "--json", cwd=tmp_path)
    )

    waited = ok_json(gpubroker(cluster, "tasks", "wait", task["task_id"], "--json"))

    assert waited["state"] == "SUCCEEDED"


def test_a_queued_task_times_out_then_is_cancelled(idle: BrokerProcess, tmp_path: Path) -> None:
    from gpubroker.client import Client

    with Client(idle.address, "key-a") as client:
        first = client.submit("echo", np.ones(2, dtype=np.float32))
        second = client.submit("echo", np.ones(2, dtype=np.float32))

    timed_out = gpubroker(idle, "tasks", "wait", second.task_id, "--timeout", "1")
    shown = ok_json(gpubroker(idle, "tasks", "show", second.task_id, "--json"))
    cancelled = ok_json(gpubroker(idle, "tasks", "cancel", first.task_id, second.task_id, "--json"))
    waited = gpubroker(idle, "tasks", "wait", second.task_id, "--json")

    assert timed_out.returncode == ExitCode.TIMEOUT, timed_out.stderr
    assert f"{second.task_id}: QUEUED" in timed_out.stderr
    assert shown["state"] == "QUEUED"
    assert shown["queue_position"] == 2
    assert [t["state"] for t in cancelled] == ["CANCELLED", "CANCELLED"]
    assert waited.returncode == ExitCode.FAILED
    assert json.loads(waited.stdout)["state"] == "CANCELLED"


def test_an_unknown_task_exits_1_and_a_wrong_key_5(cluster: BrokerProcess) -> None:
    unknown = gpubroker(cluster, "tasks", "show", "no-such-task")
    wrong = gpubroker(cluster, "tasks", "list", key="not-a-key")

    assert unknown.returncode == ExitCode.FAILED and "NOT_FOUND" in unknown.stderr
    assert wrong.returncode == ExitCode.DENIED and "UNAUTHENTICATED" in wrong.stderr
    assert "Traceback" not in unknown.stderr + wrong.stderr


def test_models_list_and_delete(cluster: BrokerProcess) -> None:
    listed = ok_json(gpubroker(cluster, "models", "list", "--json"))
    missing = gpubroker(cluster, "models", "delete", "0" * 64)

    assert listed == []
    assert missing.returncode == ExitCode.FAILED and "NOT_FOUND" in missing.stderr


def test_status_shows_an_operator_the_agent_and_a_tenant_its_share(
    cluster: BrokerProcess,
) -> None:
    operator = ok_json(gpubroker(cluster, "status", "--json", key="key-op"))
    tenant = ok_json(gpubroker(cluster, "status", "--json", key="key-b"))
    table = gpubroker(cluster, "status", key="key-op")

    assert operator["operator_view"] is True
    assert [a["agent_id"] for a in operator["agents"]] == ["cli-agent"]
    assert operator["agent_count"] == 1
    assert tenant.get("operator_view", False) is False
    assert tenant["tenant"] == "tenant-b"
    assert "agents" not in tenant and tenant["agent_count"] == 1
    assert table.returncode == 0, table.stderr
    assert "cli-agent" in table.stdout

"""An operator's workload package, end to end: ``examples/workloads`` installed for one of two
agent processes, its workloads run through the real client and checked against local torch.

Tasks naming the package's workloads must run on the agent that advertises them, never fail
with "unknown workload" on the other one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch
import torch.nn.functional as F

from gpubroker.billing.models import tasks
from gpubroker.client import Client, InvalidArgumentError, TaskHandle
from gpubroker.protos.states import TaskState
from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.paths import REPO_ROOT
from tests.support.tensors import random_tensor
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # end to end: real broker and agent processes

PACKAGE = REPO_ROOT / "examples" / "workloads"
WITH, WITHOUT = "with-package", "without-package"
"""The ids of the agent that has the package installed and of the one that has not."""
WORKLOADS = ("example.softmax", "example.sobel", "example.topk")


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package pip-installed into a folder of its own: offline, no dependencies."""
    root = tmp_path_factory.mktemp("operator-package")
    # A copy, so that the build's build/ and *.egg-info land beside it, not in the repository.
    source = shutil.copytree(
        PACKAGE,
        root / "source",
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    site = root / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    pip += ["--no-build-isolation", "--target", str(site), str(source)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return site


@pytest.fixture(scope="module")
def cluster(site_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A broker with two agents: ``WITH`` finds the package's entry points, ``WITHOUT`` does not."""
    root = tmp_path_factory.mktemp("cluster")
    broker = BrokerProcess(root).start()
    agents = [AgentProcess(root, broker.address, WITHOUT, slots=2).start()]
    with pytest.MonkeyPatch.context() as env:
        # Agents inherit this process's environment when they start; only WITH gets the folder.
        path = [str(site_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
        env.setenv("PYTHONPATH", os.pathsep.join(path))
        agents.append(AgentProcess(root, broker.address, WITH, slots=2).start())
    try:
        wait_until(
            lambda: all(f"agent {a} connected" in broker.log() for a in (WITH, WITHOUT)),
            90,
            "both agents to connect",
        )
        yield broker
    finally:
        for agent in agents:
            agent.stop()
        broker.stop()


@pytest.fixture
def client(cluster: BrokerProcess) -> Iterator[Client]:
    with Client(cluster.address, "key-a") as c:
        yield c


def test_only_the_agent_with_the_package_advertises_its_workloads(cluster: BrokerProcess) -> None:
    logs = {a: (cluster.root / f"agent-{a}.log").read_text() for a in (WITH, WITHOUT)}

    for name in WORKLOADS:
        assert name in logs[WITH]
        assert name not in logs[WITHOUT]
    assert "warm-up of workload" not in logs[WITH]  # every example() ran


def test_softmax_matches_torch_along_the_dim_param(client: Client, cluster: BrokerProcess) -> None:
    x = random_tensor((3, 5, 7), torch.float64, 1) * 40

    plain = client.submit("example.softmax", [x], dim=1)
    log = client.submit("example.softmax", [x], dim=-1, log=True)

    torch.testing.assert_close(plain.result(timeout=60).output, torch.softmax(x, dim=1))
    torch.testing.assert_close(log.result(timeout=60).output, torch.log_softmax(x, dim=-1))
    _assert_ran_on_the_agent_with_the_package(cluster, [plain, log])


def test_softmax_of_half_precision_is_computed_in_float32(
    client: Client, cluster: BrokerProcess
) -> None:
    x = (random_tensor((4, 300), torch.float32, 2) * 20).to(torch.float16)

    handle = client.submit("example.softmax", [x])

    output = handle.result(timeout=60).output
    assert output.dtype == torch.float16
    expected = torch.softmax(x.float(), dim=-1).to(torch.float16)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-3)
    _assert_ran_on_the_agent_with_the_package(cluster, [handle])


def test_sobel_matches_the_filter_written_out_by_hand(
    client: Client, cluster: BrokerProcess
) -> None:
    # float64: on a GPU, float32 convolutions may run in TF32 (torch's cuDNN default).
    images = random_tensor((2, 3, 16, 20), torch.float64, 3)

    magnitude = client.submit("example.sobel", [images])
    gradients = client.submit("example.sobel", [images], mode="gradients", padding="zeros")

    gx, gy = _sobel(F.pad(images, (1, 1, 1, 1), mode="replicate"))
    torch.testing.assert_close(magnitude.result(timeout=60).output, torch.hypot(gx, gy))
    gx, gy = _sobel(F.pad(images, (1, 1, 1, 1)))
    got_gx, got_gy = gradients.result(timeout=60).outputs
    torch.testing.assert_close(got_gx, gx)
    torch.testing.assert_close(got_gy, gy)
    _assert_ran_on_the_agent_with_the_package(cluster, [magnitude, gradients])


def test_topk_returns_values_and_indices_like_torch(client: Client, cluster: BrokerProcess) -> None:
    scores = torch.randperm(6 * 50, generator=torch.Generator().manual_seed(4)).reshape(6, 50)

    handle = client.submit("example.topk", [scores.to(torch.int32)], k=5, dim=1, largest=False)

    values, indices = handle.result(timeout=60).outputs
    expected = torch.topk(scores.to(torch.int32), 5, dim=1, largest=False)
    assert torch.equal(values, expected.values)
    assert torch.equal(indices, expected.indices)
    _assert_ran_on_the_agent_with_the_package(cluster, [handle])


def test_bad_params_are_refused_as_invalid_argument_naming_the_numbers(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match=r"k must be within 0\.\.4 .* got 9"):
        client.run("example.topk", [torch.ones(3, 4)], k=9, timeout=60)


def test_a_burst_of_tasks_all_run_on_the_agent_that_advertises_their_workload(
    client: Client, cluster: BrokerProcess
) -> None:
    # Both agents have free slots: a task sent to WITHOUT would fail there with
    # "unknown workload" (and a task of a built-in may run on either).
    x = random_tensor((8, 32), torch.float32, 5)
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("example.softmax", {}),
        ("example.sobel", {}),
        ("example.topk", {"k": 3}),
    ]
    handles = [client.submit(name, [x], **params) for _ in range(4) for name, params in kinds]

    finals = [h.wait(timeout=60) for h in handles]

    assert [f.state for f in finals] == [TaskState.SUCCEEDED] * len(handles)
    _assert_ran_on_the_agent_with_the_package(cluster, handles)
    assert "unknown workload" not in (cluster.root / f"agent-{WITHOUT}.log").read_text()


def _sobel(padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel gx and gy of images padded by one pixel, from shifted views (no conv2d)."""

    def at(dy: int, dx: int) -> torch.Tensor:
        height, width = padded.shape[-2] - 2, padded.shape[-1] - 2
        return padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    gx = at(-1, 1) + 2 * at(0, 1) + at(1, 1) - at(-1, -1) - 2 * at(0, -1) - at(1, -1)
    gy = at(1, -1) + 2 * at(1, 0) + at(1, 1) - at(-1, -1) - 2 * at(-1, 0) - at(-1, 1)
    return gx, gy


def _assert_ran_on_the_agent_with_the_package(
    broker: BrokerProcess, handles: list[TaskHandle]
) -> None:
    """Each task's row: succeeded at its first attempt, on ``WITH``, with no error."""
    engine = sa.create_engine(broker.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    tasks.c.id,
                    tasks.c.state,
                    tasks.c.attempt,
                    tasks.c.agent_id,
                    tasks.c.error_message,
                ).where(tasks.c.id.in_([h.task_id for h in handles]))
            ).all()
    finally:
        engine.dispose()
    assert len(rows) == len(handles)
    wrong = [r for r in rows if r.agent_id != WITH or r.attempt != 1 or r.error_message]
    assert not wrong, f"tasks not run (only) on {WITH}: {wrong}"

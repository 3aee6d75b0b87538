"""End to end on loopback: client -> broker process -> agent processes -> result, billed.

One broker and two agents serve the whole module; every workload and every dtype goes
through them and comes back checked against torch run locally.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import torch

from gpubroker.billing.models import usage
from gpubroker.client import Client, InvalidArgumentError, TaskFailedError
from tests.support.cluster import AgentProcess, BrokerProcess, agent_gpu_type
from tests.support.tensors import random_tensor

pytestmark = pytest.mark.slow  # end to end: real broker (and agent) processes

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.complex64, torch.complex128,
]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    root = tmp_path_factory.mktemp("cluster")
    broker = BrokerProcess(root).start()
    agents = [AgentProcess(root, broker.address, f"agent-{i}", slots=2).start() for i in range(2)]
    try:
        with Client(broker.address, "key-a") as client:
            client.run("echo", [torch.zeros(1)], timeout=60)  # both agents up and serving
        yield broker
    finally:
        for agent in agents:
            agent.stop()
        broker.stop()


@pytest.fixture
def client(cluster: BrokerProcess) -> Iterator[Client]:
    with Client(cluster.address, "key-a") as c:
        yield c


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_echo_returns_every_dtype_bit_exact(client: Client, dtype: torch.dtype) -> None:
    tensor = random_tensor((3, 5, 2), dtype)

    result = client.run("echo", [tensor])

    output = result.output
    assert isinstance(output, torch.Tensor)
    assert output.dtype == dtype and output.shape == tensor.shape
    assert output.view(torch.uint8).equal(tensor.view(torch.uint8))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(2.5),
        torch.empty(0),
        torch.empty(3, 0, 2),
        torch.arange(24).reshape(2, 3, 4)[:, ::2],
    ],
    ids=["0-d", "empty", "empty-3d", "non-contiguous"],
)
def test_echo_handles_scalars_empty_and_strided_tensors(
    client: Client, tensor: torch.Tensor
) -> None:
    result = client.run("echo", [tensor])

    assert result.output.shape == tensor.shape
    assert torch.equal(result.output, tensor)


def test_numpy_inputs_come_back_as_numpy_arrays(client: Client) -> None:
    arrays: list[np.ndarray[Any, Any]] = [
        np.arange(12, dtype=np.int32).reshape(3, 4),
        np.asarray(np.float64(7.25)),
        np.ones((2, 2), np.float16),
    ]

    result = client.run("echo", arrays)

    assert len(result.outputs) == 3
    for sent, got in zip(arrays, result.outputs, strict=True):
        assert isinstance(got, np.ndarray)
        assert got.dtype == np.asarray(sent).dtype
        np.testing.assert_array_equal(got, sent)


def test_matmul_matches_torch(client: Client) -> None:
    a, b = random_tensor((64, 32), torch.float32, 1), random_tensor((32, 16), torch.float32, 2)

    result = client.run("matmul", [a, b])

    torch.testing.assert_close(result.output, a @ b)
    assert result.compute_seconds > 0
    assert result.gpu_type == agent_gpu_type()


def test_add_broadcasts_like_torch(client: Client) -> None:
    a, b = random_tensor((4, 1, 3), torch.float64, 3), random_tensor((5, 3), torch.float64, 4)

    result = client.run("add", [a, b])

    torch.testing.assert_close(result.output, a + b)


def test_sum_takes_dim_and_keepdim_params(client: Client) -> None:
    x = random_tensor((4, 6), torch.float32, 5)

    result = client.run("sum", [x], dim=1, keepdim=True)

    torch.testing.assert_close(result.output, x.sum(dim=1, keepdim=True))


def test_conv2d_matches_torch(client: Client) -> None:
    x, w, bias = (
        random_tensor((2, 3, 16, 16), torch.float32, 6),
        random_tensor((8, 3, 3, 3), torch.float32, 7),
        random_tensor((8,), torch.float32, 8),
    )

    result = client.run("conv2d", [x, w, bias], stride=2, padding=1)

    expected = torch.nn.functional.conv2d(x, w, bias, stride=2, padding=1)
    torch.testing.assert_close(result.output, expected)


def test_fft_returns_complex_output(client: Client) -> None:
    x = random_tensor((4, 32), torch.float32, 9)

    result = client.run("fft", [x])

    assert result.output.dtype == torch.complex64
    torch.testing.assert_close(result.output, torch.fft.fft(x))


def test_linalg_solve_matches_torch(client: Client) -> None:
    a = random_tensor((8, 8), torch.float64, 10) + 8 * torch.eye(8, dtype=torch.float64)
    b = random_tensor((8, 3), torch.float64, 11)

    result = client.run("linalg.solve", [a, b])

    torch.testing.assert_close(result.output, torch.linalg.solve(a, b))


def test_submit_returns_a_handle_that_resolves_to_the_result(client: Client) -> None:
    handle = client.submit("matmul", [torch.eye(3), torch.full((3, 2), 2.0)])

    result = handle.result(timeout=60)

    assert torch.equal(result.output, torch.full((3, 2), 2.0))
    assert handle.status().state.value == "succeeded"
    assert handle.done()


def test_a_workload_error_fails_the_task_with_its_message(client: Client) -> None:
    handle = client.submit("matmul", [torch.ones(2, 3), torch.ones(2, 3)])

    with pytest.raises((TaskFailedError, InvalidArgumentError)) as excinfo:
        handle.result(timeout=60)

    assert "matmul" in str(excinfo.value) or "shape" in str(excinfo.value)
    assert handle.status().state.value == "failed"


def test_every_successful_task_has_one_priced_usage_row(
    client: Client, cluster: BrokerProcess
) -> None:
    handle = client.submit("sum", [torch.ones(100)])
    handle.result(timeout=60)

    engine = sa.create_engine(cluster.database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(usage).where(usage.c.task_id == handle.task_id)).all()
    engine.dispose()

    assert len(rows) == 1
    row = rows[0]._mapping
    assert row["tenant"] == "tenant-a"
    assert row["workload"] == "sum"
    assert row["gpu_type"] == agent_gpu_type()
    assert row["compute_seconds"] > 0
    assert row["bytes_in"] == 400 and row["bytes_out"] == 4
    assert row["cost_nanousd"] >= 0 and row["price_per_hour_nanousd"] > 0


async def test_the_async_client_submits_runs_watches_and_cancels(cluster: BrokerProcess) -> None:
    from gpubroker.client import AsyncClient

    async with AsyncClient(cluster.address, "key-a") as aclient:
        a, b = random_tensor((8, 8), torch.float32, 12), random_tensor((8, 8), torch.float32, 13)
        handle = await aclient.submit("matmul", [a, b])
        result = await handle.result(timeout=60)
        ran = await aclient.run("add", [a, b], timeout=60)
        states = [s.state.value async for s in aclient.watch(handle.task_id)]
        sleeper = await aclient.submit("sleep", [a], seconds=600.0)
        cancelled = await sleeper.cancel()

    torch.testing.assert_close(result.output, a @ b)
    torch.testing.assert_close(ran.output, a + b)
    assert states == ["succeeded"]
    assert cancelled.state.value == "cancelled"


def test_watch_reports_each_state_until_the_task_is_final(client: Client) -> None:
    handle = client.submit("sleep", [torch.ones(1)], seconds=0.5)

    states = [s.state.value for s in client.watch(handle.task_id, timeout=60)]

    assert states[-1] == "succeeded"
    assert "running" in states
    assert handle.wait(timeout=10).state.value == "succeeded"

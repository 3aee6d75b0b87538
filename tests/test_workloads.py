"""Built-in workloads and the runner, on the CPU, without a broker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence

import pytest
import torch

from gpu_agent.errors import TaskCancelledError, UnknownWorkloadError, WorkloadArgumentError
from gpu_agent.runner import Runner, detect_device, gpu_slug
from gpu_agent.workloads import Param, WorkloadContext, lookup, registry

BUILTINS = {"matmul", "add", "sum", "conv2d", "fft", "linalg.solve", "echo", "sleep"}


def _call(
    name: str, inputs: Sequence[torch.Tensor], params: Mapping[str, Param] | None = None
) -> list[torch.Tensor]:
    ctx = WorkloadContext(torch.device("cpu"), threading.Event())
    return list(lookup(name, registry())(inputs, params or {}, ctx))


def test_every_builtin_is_registered() -> None:
    assert set(registry()) >= BUILTINS


def test_an_unknown_workload_names_the_known_ones() -> None:
    with pytest.raises(UnknownWorkloadError, match="matmul"):
        lookup("nope", registry())


def test_builtins_match_plain_torch() -> None:
    a, b = torch.randn(5, 4), torch.randn(4, 3)
    x, w = torch.randn(1, 2, 8, 8), torch.randn(3, 2, 3, 3)
    m = torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)

    torch.testing.assert_close(_call("matmul", [a, b])[0], a @ b)
    torch.testing.assert_close(_call("add", [a, a])[0], a + a)
    torch.testing.assert_close(_call("sum", [a])[0], a.sum())
    torch.testing.assert_close(
        _call("sum", [a], {"dim": 0, "keepdim": True})[0], a.sum(0, keepdim=True)
    )
    torch.testing.assert_close(
        _call("conv2d", [x, w], {"padding": 1})[0], torch.nn.functional.conv2d(x, w, padding=1)
    )
    torch.testing.assert_close(
        _call("fft", [a], {"n": 8, "norm": "ortho"})[0], torch.fft.fft(a, n=8, norm="ortho")
    )
    torch.testing.assert_close(
        _call("linalg.solve", [m, m[:, :2]])[0], torch.linalg.solve(m, m[:, :2])
    )


@pytest.mark.parametrize(
    ("name", "inputs", "params", "message"),
    [
        ("matmul", [torch.ones(2, 3)], {}, "takes 2 input tensors, got 1"),
        ("matmul", [torch.ones(2, 3), torch.ones(2, 3)], {}, "matmul:"),
        ("sum", [torch.ones(2)], {"axis": 0}, "no parameter"),
        ("sum", [torch.ones(2)], {"dim": "0"}, "must be int"),
        ("sum", [torch.ones(2)], {"keepdim": 1}, "must be bool"),
        ("conv2d", [torch.ones(1, 2, 4, 4)], {}, "takes 2 to 3 input tensors"),
        ("sleep", [], {"seconds": 99999.0}, "0..3600"),
    ],
)
def test_bad_arguments_are_reported_with_their_numbers(
    name: str, inputs: list[torch.Tensor], params: dict[str, Param], message: str
) -> None:
    with pytest.raises(WorkloadArgumentError, match=message):
        _call(name, inputs, params)


def test_sleep_stops_when_cancelled() -> None:
    cancelled = threading.Event()
    ctx = WorkloadContext(torch.device("cpu"), cancelled)
    threading.Timer(0.1, cancelled.set).start()
    started = time.monotonic()

    with pytest.raises(TaskCancelledError):
        lookup("sleep", registry())([], {"seconds": 30.0}, ctx)

    assert time.monotonic() - started < 5


def test_gpu_names_map_to_the_accelerator_types_they_are_sold_as() -> None:
    assert gpu_slug("NVIDIA L4") == "nvidia-l4"
    assert gpu_slug("Tesla T4") == "nvidia-tesla-t4"
    assert gpu_slug("NVIDIA A100-SXM4-40GB") == "nvidia-tesla-a100"
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb"
    assert gpu_slug("Some New GPU") == "some-new-gpu"


async def test_the_runner_times_work_and_runs_slots_at_once() -> None:
    runner = Runner(detect_device("cpu"), slots=2)
    try:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(
                runner.run("sleep", [torch.ones(1)], {"seconds": 0.3}, threading.Event())
                for _ in range(2)
            )
        )
        elapsed = time.monotonic() - started
    finally:
        runner.close()

    assert all(0.25 < o.compute_seconds < 2 for o in outcomes)
    assert elapsed < 0.55  # two 0.3 s sleeps overlapped
    assert torch.equal(outcomes[0].outputs[0], torch.ones(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_work_is_timed_with_events() -> None:
    runner = Runner(detect_device("cuda"), slots=1)
    try:
        outcome = await runner.run("matmul", [torch.randn(2048, 2048)] * 2, {}, threading.Event())
    finally:
        runner.close()

    assert outcome.outputs[0].device.type == "cpu"
    assert 0 < outcome.compute_seconds < 5

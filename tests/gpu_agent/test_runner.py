"""The runner: device detection, timing, concurrency up to its slots, and failure mapping."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import pytest
import torch

from gpubroker.gpu_agent.errors import (
    TaskCancelledError,
    UnknownWorkloadError,
    WorkloadArgumentError,
    WorkloadFailedError,
)
from gpubroker.gpu_agent.model_loader import load_model
from gpubroker.gpu_agent.runner import (
    SWITCH_INTERVAL_S,
    Runner,
    detect_device,
    favour_workload_threads,
    gpu_slug,
)
from gpubroker.gpu_agent.workloads import Param, Workload, WorkloadContext, registry
from tests.gpu_agent.models import model_file

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ConcurrencyProbe:
    """A workload that records how many copies of itself run at the same time."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.active = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        with self._lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(self.hold_s)
        with self._lock:
            self.active -= 1
        return list(inputs)


def _returning(value: object) -> Workload:
    def workload(
        inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        if isinstance(value, BaseException):
            raise value
        return value  # type: ignore[return-value]

    return workload


def _make_runner(slots: int, extra: Mapping[str, Workload] | None = None) -> Runner:
    return Runner(detect_device("cpu"), slots, {**registry(), **(extra or {})})


@pytest.fixture
async def runner_factory() -> AsyncIterator[Callable[..., Runner]]:
    made: list[Runner] = []

    def make(slots: int = 2, extra: Mapping[str, Workload] | None = None) -> Runner:
        made.append(_make_runner(slots, extra))
        return made[-1]

    yield make
    for runner in made:
        runner.close()


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA L4", "nvidia-l4"),
        ("Tesla T4", "nvidia-tesla-t4"),
        ("NVIDIA A100-SXM4-40GB", "nvidia-tesla-a100"),
        ("NVIDIA A100-SXM4-80GB", "nvidia-a100-80gb"),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb"),
        ("NVIDIA H200", "nvidia-h200-141gb"),
        ("Tesla V100-SXM2-16GB", "nvidia-tesla-v100"),
        ("NVIDIA L40S", "nvidia-l40s"),
        ("Some New GPU", "some-new-gpu"),
    ],
)
def test_gpu_names_map_to_the_accelerator_types_they_are_sold_as(name: str, slug: str) -> None:
    assert gpu_slug(name) == slug


def test_the_cpu_device_reports_cpu_and_physical_memory() -> None:
    info = detect_device("cpu")

    assert info.device == torch.device("cpu")
    assert info.gpu_type == "cpu"
    assert info.memory_bytes > 1 << 20


def test_auto_picks_cuda_only_when_torch_sees_it() -> None:
    info = detect_device("auto")

    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_an_unknown_device_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="'tpu'"):
        detect_device("tpu")


async def test_a_sleep_of_0_2_s_is_billed_about_0_2_s(
    runner_factory: Callable[..., Runner],
) -> None:
    runner = runner_factory(slots=1)

    outcome = await runner.run("sleep", [torch.ones(2)], {"seconds": 0.2}, threading.Event())

    assert 0.2 <= outcome.compute_seconds < 1.0
    assert torch.equal(outcome.outputs[0], torch.ones(2))


async def test_even_a_tiny_matmul_is_billed_more_than_zero(
    runner_factory: Callable[..., Runner],
) -> None:
    runner = runner_factory(slots=1)
    a, b = torch.randn(3, 4), torch.randn(4, 2)

    outcome = await runner.run("matmul", [a, b], {}, threading.Event())

    assert outcome.compute_seconds > 0
    assert torch.equal(outcome.outputs[0], a @ b)


async def test_tasks_run_concurrently_up_to_the_slots_and_no_further(
    runner_factory: Callable[..., Runner],
) -> None:
    probe = ConcurrencyProbe(hold_s=0.15)
    runner = runner_factory(slots=2, extra={"probe": probe})
    started = time.monotonic()

    await asyncio.gather(
        *(runner.run("probe", [torch.ones(1)], {}, threading.Event()) for _ in range(4))
    )

    assert probe.most == 2
    assert time.monotonic() - started >= 0.3  # two rounds of two, never four at once


async def test_two_overlapping_tasks_split_the_overlap_and_add_up_to_the_busy_time(
    runner_factory: Callable[..., Runner],
) -> None:
    runner = runner_factory(slots=2)
    began = time.monotonic()

    short, long = await asyncio.gather(
        runner.run("sleep", [torch.ones(1)], {"seconds": 0.3}, threading.Event()),
        runner.run("sleep", [torch.ones(1)], {"seconds": 0.6}, threading.Event()),
    )
    wall = time.monotonic() - began

    # Both ran for the first 0.3 s, then the long one alone: not 0.3 + 0.6 s for 0.6 s of wall.
    billed = short.compute_seconds + long.compute_seconds
    assert billed <= wall + 1e-6
    assert short.compute_seconds == pytest.approx(0.3 / 2, abs=0.05)
    assert long.compute_seconds == pytest.approx(0.3 / 2 + 0.3, abs=0.05)
    assert runner.meter.billed_seconds == pytest.approx(billed, abs=1e-9)
    assert runner.meter.busy_seconds == runner.meter.billed_seconds


async def test_tasks_one_after_the_other_are_each_billed_their_whole_time(
    runner_factory: Callable[..., Runner],
) -> None:
    runner = runner_factory(slots=2)

    first = await runner.run("sleep", [torch.ones(1)], {"seconds": 0.2}, threading.Event())
    second = await runner.run("sleep", [torch.ones(1)], {"seconds": 0.3}, threading.Event())

    assert 0.2 <= first.compute_seconds < 0.25
    assert 0.3 <= second.compute_seconds < 0.35
    assert runner.meter.busy_seconds == pytest.approx(
        first.compute_seconds + second.compute_seconds, abs=1e-9
    )


async def test_outputs_come_back_contiguous_on_the_cpu_with_views_resolved(
    runner_factory: Callable[..., Runner],
) -> None:
    x = torch.randn(3, 4, dtype=torch.complex64)
    runner = runner_factory(extra={"views": _returning([x.t(), x.conj(), -x])})

    outcome = await runner.run("views", [], {}, threading.Event())

    transposed, conjugated, negated = outcome.outputs
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in outcome.outputs)
    assert not conjugated.is_conj() and not negated.is_neg()
    assert torch.equal(transposed, x.t()) and torch.equal(conjugated, x.conj())


async def test_an_exception_in_a_workload_becomes_a_failure_naming_its_type(
    runner_factory: Callable[..., Runner],
) -> None:
    runner = runner_factory(extra={"boom": _returning(RuntimeError("kaput at step 3"))})

    where = r"\n  at test_runner\.py:\d+ in workload$"
    with pytest.raises(WorkloadFailedError, match=r"^RuntimeError: kaput at step 3" + where):
        await runner.run("boom", [], {}, threading.Event())


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (torch.ones(2), "returned Tensor, not a sequence of tensors"),
        ([torch.ones(2), 3], "output 1 is a int, not a tensor"),
        ([torch.ones(2, dtype=torch.uint16)], "dtype torch.uint16, which the wire cannot carry"),
    ],
    ids=["bare-tensor", "non-tensor", "unsupported-dtype"],
)
async def test_outputs_the_wire_cannot_carry_are_the_workloads_failure(
    runner_factory: Callable[..., Runner], returned: object, message: str
) -> None:
    runner = runner_factory(extra={"odd": _returning(returned)})

    with pytest.raises(WorkloadFailedError, match=message):
        await runner.run("odd", [], {}, threading.Event())


async def test_argument_and_cancel_errors_pass_through_unchanged(
    runner_factory: Callable[..., Runner],
) -> None:
    runner = runner_factory()
    cancelled = threading.Event()
    cancelled.set()

    with pytest.raises(WorkloadArgumentError):
        await runner.run("matmul", [torch.ones(2)], {}, threading.Event())
    with pytest.raises(TaskCancelledError):
        await runner.run("sleep", [], {"seconds": 5.0}, cancelled)
    with pytest.raises(UnknownWorkloadError):
        await runner.run("nope", [], {}, threading.Event())


async def test_a_task_cancelled_before_it_starts_never_runs_its_workload(
    runner_factory: Callable[..., Runner],
) -> None:
    calls: list[int] = []

    def counting(
        inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        calls.append(1)  # a workload that never looks at ctx.cancelled
        return [inputs[0] + 1]

    runner = runner_factory(extra={"count": counting})
    cancelled = threading.Event()
    cancelled.set()

    with pytest.raises(TaskCancelledError, match="before it started"):
        await runner.run("count", [torch.ones(1)], {}, cancelled)
    assert calls == []
    assert runner.meter.billed_seconds == 0.0


class WarmUpProbe(ConcurrencyProbe):
    """A workload with an example that records the threads it ran on, and how many at once."""

    def __init__(self) -> None:
        super().__init__(hold_s=0.05)
        self.threads: list[int] = []

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        self.threads.append(threading.get_ident())
        return super().__call__(inputs, params, ctx)

    def example(self) -> tuple[list[torch.Tensor], dict[str, Param]]:
        return [torch.ones(2)], {}


async def test_warm_up_runs_each_example_once_per_slot_thread_one_thread_at_a_time(
    runner_factory: Callable[..., Runner],
) -> None:
    probe = WarmUpProbe()
    runner = runner_factory(slots=3, extra={"probe": probe})

    seconds = await runner.warm_up()

    assert len(probe.threads) == 3 and len(set(probe.threads)) == 3  # every slot's thread
    assert probe.most == 1  # in turns: torch's lazy loaders are not thread-safe
    assert seconds >= 3 * 0.05
    outcome = await runner.run("probe", [torch.ones(1)], {}, threading.Event())
    assert torch.equal(outcome.outputs[0], torch.ones(1))  # the slots still serve afterwards


async def test_a_failing_example_is_logged_and_the_others_still_warm_up(
    runner_factory: Callable[..., Runner], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(
        inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        raise RuntimeError("no such kernel")

    broken.example = lambda: ([torch.ones(1)], {})  # type: ignore[attr-defined]
    probe = WarmUpProbe()
    runner = runner_factory(slots=1, extra={"broken": broken, "probe": probe})

    await runner.warm_up()

    assert len(probe.threads) == 1
    assert "warm-up of workload 'broken' failed: RuntimeError: no such kernel" in caplog.text


async def test_warm_ups_are_metered_apart_and_model_calls_with_the_tasks(
    runner_factory: Callable[..., Runner],
) -> None:
    runner = runner_factory(slots=2, extra={"probe": WarmUpProbe()})
    model = load_model(model_file("mlp"))

    await runner.warm_up()
    await runner.warm_up_model(model, [torch.zeros(1, 8)])
    warmed = runner.meter.busy_seconds
    called = await runner.call_model(model, [torch.zeros(1, 8)])

    assert warmed == 0.0  # a warm-up never shares the device with a task's window
    assert called.compute_seconds > 0
    assert runner.meter.billed_seconds == runner.meter.busy_seconds == called.compute_seconds


def test_agent_processes_shorten_the_gil_switch_interval() -> None:
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # Python's default
        favour_workload_threads()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.gpu
@needs_cuda
async def test_cuda_work_is_timed_with_events_and_comes_back_on_the_cpu() -> None:
    runner = Runner(detect_device("cuda"), slots=2)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    try:
        outcome = await runner.run("matmul", [a, b], {}, threading.Event())
        slept = await runner.run("sleep", [a], {"seconds": 0.05}, threading.Event())
    finally:
        runner.close()

    assert runner.device.gpu_type != "cpu"
    assert outcome.outputs[0].device.type == "cpu"
    torch.testing.assert_close(outcome.outputs[0], a @ b, rtol=1e-3, atol=1e-2)
    assert 0 < outcome.compute_seconds < 1
    assert slept.compute_seconds >= 0.05  # GPU events span host waits on the same stream too


class StreamProbe:
    """A workload that records the CUDA stream it was run on, then squares its input there.

    The runner gives a workload nothing but ``ctx``; the stream it chose for the slot is the
    thread's current stream while the workload runs (``torch.cuda.current_stream``). Calls
    meet at a barrier, so they have all been inside a workload at the same time: with two
    parties and two slots, the two calls ran concurrently on two slots, or the barrier breaks.
    """

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=30.0)
        self.streams: list[int] = []
        self.default_stream = 0
        self._lock = threading.Lock()

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        stream = torch.cuda.current_stream(ctx.device)
        with self._lock:
            self.streams.append(stream.cuda_stream)  # the raw cudaStream_t handle
            self.default_stream = torch.cuda.default_stream(ctx.device).cuda_stream
        self.barrier.wait()  # both slots are inside a workload now
        return [inputs[0] @ inputs[0]]  # enqueued on the current stream


@pytest.mark.gpu
@needs_cuda
async def test_concurrent_cuda_slots_each_get_their_own_stream() -> None:
    probe = StreamProbe(parties=2)
    runner = Runner(detect_device("cuda"), slots=2, workloads={**registry(), "probe": probe})
    x = torch.randn(512, 512)
    try:
        outcomes = await asyncio.gather(
            *(runner.run("matmul", [x, x], {}, threading.Event()) for _ in range(4))
        )
        probed = await asyncio.gather(
            *(runner.run("probe", [x], {}, threading.Event()) for _ in range(2))
        )
    finally:
        runner.close()

    for outcome in [*outcomes, *probed]:
        torch.testing.assert_close(outcome.outputs[0], x @ x, rtol=1e-3, atol=1e-2)
        assert outcome.compute_seconds > 0
    # Two slots at once, two streams; neither is the device's default (legacy) stream.
    assert len(probe.streams) == 2
    assert len(set(probe.streams)) == 2, f"both slots ran on stream {probe.streams[0]:#x}"
    assert probe.default_stream not in probe.streams


@pytest.mark.gpu
@needs_cuda
async def test_cuda_warm_up_keeps_library_loads_off_the_first_bill(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = Runner(detect_device("cuda"), slots=2)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 1024)
    spd = torch.eye(64, dtype=torch.float64) * 2
    try:
        await runner.warm_up()
        matmul = await runner.run("matmul", [a, b], {}, threading.Event())
        solved = await asyncio.gather(
            *(runner.run("linalg.solve", [spd, spd], {}, threading.Event()) for _ in range(2))
        )
    finally:
        runner.close()

    assert "warm-up" not in caplog.text  # two threads' first torch.linalg calls did not race
    # Cold, this first matmul was billed 3.2 s on an H100 (cuBLAS loading); warm, ~20 ms.
    assert matmul.compute_seconds < 1.0
    assert all(torch.equal(s.outputs[0], torch.eye(64, dtype=torch.float64)) for s in solved)


@pytest.mark.gpu
@needs_cuda
async def test_overlapping_cuda_tasks_are_billed_their_shares_not_their_event_times() -> None:
    runner = Runner(detect_device("cuda"), slots=2)
    x = torch.ones(4)
    try:
        began = time.monotonic()
        short, long = await asyncio.gather(
            runner.run("sleep", [x], {"seconds": 0.3}, threading.Event()),
            runner.run("sleep", [x], {"seconds": 0.6}, threading.Event()),
        )
        wall = time.monotonic() - began
        alone = await runner.run("sleep", [x], {"seconds": 0.2}, threading.Event())
    finally:
        runner.close()

    # The events of each span its whole sleep (0.3 and 0.6 s); the shared 0.3 s is split.
    assert short.compute_seconds + long.compute_seconds <= wall + 1e-6
    assert short.compute_seconds == pytest.approx(0.3 / 2, abs=0.05)
    assert long.compute_seconds == pytest.approx(0.3 / 2 + 0.3, abs=0.05)
    assert alone.compute_seconds == pytest.approx(0.2, abs=0.02)  # alone: its event time

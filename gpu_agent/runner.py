"""Runs workloads on the device and measures what each task is billed.

``Runner`` owns the agent's one blocking boundary: a ``ThreadPoolExecutor`` with one worker per
slot, so up to ``slots`` tasks run at once on the one device. A task is billed its compute
window, from the launch of its work on the device (inputs already there) until that work has
finished, with every stretch it overlapped other tasks' windows split evenly between them: the
runner's ``DeviceMeter`` (processor sharing, see ``gpu_agent/meter.py``) opens and closes the
windows on a monotonic clock, so the bills of one device's tasks add up to at most the time the
device was busy, and a task alone is billed its whole window. On the CPU torch ops are
synchronous and that share is the bill. On CUDA each worker thread has its own stream, CUDA
events recorded on it time the task's device work (one slot's kernels never inflate another
slot's events), and the bill is the lesser of the event time and the meter's share of the host
window around the events (opened before the launch, closed once the end event is reached).
Warm-up calls (``warm_up``, ``warm_up_model``) are metered apart and never shrink a task's share.

Both clocks run while a workload's host code runs, so two things the tenant did not cause are
kept out of the window. One-time costs (CUDA context, cuBLAS/cuDNN/cuFFT/cuSOLVER loads, kernel
modules, CPU thread pools: seconds on a GPU) are paid by ``warm_up`` before the agent takes work.
And torch releases the GIL around each op, so a worker thread that wants it back waits until the
event loop thread (busy relaying other tasks' bytes) lets go, by default after up to 5 ms per op:
``favour_workload_threads`` shortens that switch interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from gpubroker.gpu_agent.diagnosis import describe_exception, describe_model_failure
from gpubroker.gpu_agent.errors import AgentError, TaskCancelledError, WorkloadFailedError
from gpubroker.gpu_agent.meter import DeviceMeter
from gpubroker.gpu_agent.model_loader import LoadedModel
from gpubroker.gpu_agent.workloads import (
    Workload,
    WorkloadContext,
    broken_workload,
    example,
    load_workloads,
    lookup,
)
from gpubroker.protos.modelfile import WORKLOAD_PREFIX
from gpubroker.protos.wire import DTYPE_ITEMSIZE, Param

__all__ = [
    "SWITCH_INTERVAL_S",
    "DeviceInfo",
    "RunOutcome",
    "Runner",
    "detect_device",
    "favour_workload_threads",
    "gpu_slug",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

SWITCH_INTERVAL_S = 0.0001
"""The GIL switch interval in an agent process (Python's default: 5 ms). With a busy Python thread
beside it, a tiny ``add`` on an H100 was billed 10.6 ms at the default and 0.49 ms at this value
(90 us with the GIL free); on the CPU 5.4 ms and 0.1 ms (docs/performance.md, "What a task is
billed")."""

_WARM_UP_WAIT_S = 120.0  # how long a warm-up thread waits for the others to start


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """The device the agent runs on, as announced in its hello."""

    device: torch.device
    gpu_type: str
    """GCE accelerator name, e.g. ``nvidia-l4``; ``cpu`` without a GPU."""
    memory_bytes: int
    """GPU memory, or physical RAM on the CPU."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """A finished workload."""

    outputs: tuple[torch.Tensor, ...]
    """On the CPU, contiguous."""
    compute_seconds: float
    """What the task is billed: its compute window with any overlap with other tasks' windows on
    the device split evenly (see the module doc); on a GPU never more than its CUDA-event time."""
    model_load_seconds: float = 0.0
    """Seconds this task waited for its model to be fetched, checked, loaded and warmed up
    (never billed); 0 when it was resident."""
    batch_tasks: int = 0
    """Tasks that shared the model call (1: alone); 0 for an operator workload."""


# Most specific first: the 80 GB A100 is sold under a different name than the 40 GB one.
_GPU_SLUGS = (
    (r"\bA100\b.*\b80GB\b", "nvidia-a100-80gb"),
    (r"\bA100\b", "nvidia-tesla-a100"),
    (r"\bH100\b", "nvidia-h100-80gb"),
    (r"\bH200\b", "nvidia-h200-141gb"),
    (r"\bB200\b", "nvidia-b200"),
    (r"\bRTX PRO 6000\b", "nvidia-rtx-pro-6000"),
    (r"\bL4\b", "nvidia-l4"),
    (r"\bT4\b", "nvidia-tesla-t4"),
    (r"\bV100\b", "nvidia-tesla-v100"),
    (r"\bP100\b", "nvidia-tesla-p100"),
    (r"\bP4\b", "nvidia-tesla-p4"),
    (r"\bK80\b", "nvidia-tesla-k80"),
)


def gpu_slug(name: str) -> str:
    """Maps a CUDA device name to the GCE accelerator type it is sold as.

    ``"NVIDIA A100-SXM4-40GB"`` becomes ``"nvidia-tesla-a100"``; a name we do not know becomes
    its lowercase slug (``"Some New GPU"`` → ``"some-new-gpu"``).
    """
    for pattern, slug in _GPU_SLUGS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return slug
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def detect_device(choice: str) -> DeviceInfo:
    """Resolves ``auto``/``cpu``/``cuda`` to a device, describes it, and warms CUDA up.

    Raises:
        ValueError: ``choice`` is unknown, or ``cuda`` was asked for and there is none.
    """
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA device")
    if choice == "cpu" or not torch.cuda.is_available():
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return DeviceInfo(torch.device("cpu"), "cpu", int(memory))
    device = torch.device("cuda", 0)
    # Creating the CUDA context takes from 100 ms to seconds: pay it now, not on a billed task.
    torch.zeros(1, device=device).add_(1).item()
    props = torch.cuda.get_device_properties(device)
    return DeviceInfo(device, gpu_slug(torch.cuda.get_device_name(device)), props.total_memory)


def favour_workload_threads() -> None:
    """Sets the process's GIL switch interval to ``SWITCH_INTERVAL_S`` (see the module doc)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


class Runner:
    """Executes workloads on worker threads, at most ``slots`` at a time."""

    def __init__(
        self, device: DeviceInfo, slots: int, workloads: Mapping[str, Workload] | None = None
    ) -> None:
        self.device = device
        self.slots = slots
        problems: dict[str, str] = {}
        if workloads is None:
            workloads, problems = load_workloads()
        self.workloads: dict[str, Workload] = dict(workloads)
        self.broken: dict[str, str] = problems
        """Entry points that were refused, by name, and why (the hello reports them); a name
        no other workload holds runs ``broken_workload``, which fails its tasks saying why."""
        for name, problem in problems.items():
            if name not in self.workloads and not name.startswith(WORKLOAD_PREFIX):
                self.workloads[name] = broken_workload(name, problem)
        self.meter = DeviceMeter()
        """Splits the device between the tasks' compute windows; its totals cover tasks only."""
        self._warm_up_meter = DeviceMeter()
        self._streams = threading.local()
        self._executor = ThreadPoolExecutor(
            max_workers=slots, thread_name_prefix="workload", initializer=self._prepare_thread
        )

    async def run(
        self,
        workload_name: str,
        inputs: Sequence[torch.Tensor],
        params: Mapping[str, Param],
        cancelled: threading.Event,
    ) -> RunOutcome:
        """Runs one workload on a worker thread and times it.

        Raises:
            UnknownWorkloadError: no workload has that name.
            WorkloadArgumentError: the workload refused its inputs or params.
            TaskCancelledError: the workload saw ``cancelled`` and stopped.
            WorkloadFailedError: the workload (or moving its tensors) raised anything else.
        """
        fn = lookup(workload_name, self.workloads)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._execute, workload_name, fn, inputs, params, cancelled, self.meter
        )

    async def call_model(self, model: LoadedModel, inputs: Sequence[torch.Tensor]) -> RunOutcome:
        """Calls a loaded model once on a worker thread; the call is billed as one task would be.

        Raises:
            WorkloadFailedError: the call raised; the message names the graph node that failed.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._call_model, model, inputs, self.meter
        )

    async def warm_up_model(self, model: LoadedModel, inputs: Sequence[torch.Tensor]) -> RunOutcome:
        """``call_model`` for a call no task is billed for: metered apart from the tasks' calls.

        Raises:
            WorkloadFailedError: the call raised; the message names the graph node that failed.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._call_model, model, inputs, self._warm_up_meter
        )

    async def offload(self, fn: Callable[..., T], *args: object) -> T:
        """Runs blocking device work (loading a model, say) on a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def warm_up(self) -> float:
        """Runs each workload that has an example once on every worker thread; returns seconds.

        Called before the agent takes work, so the first tenant is not billed for loading
        libraries and kernels (3 s for a first matmul on an H100, see docs/performance.md). A
        failing example is logged and skipped.
        """
        barrier, turn = threading.Barrier(self.slots), threading.Lock()
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await asyncio.gather(
            *(
                loop.run_in_executor(self._executor, self._warm_up, barrier, turn)
                for _ in range(self.slots)
            )
        )
        return time.perf_counter() - started

    def close(self) -> None:
        """Waits for running workloads, then stops the worker threads."""
        self._executor.shutdown(wait=True)

    # -- on a worker thread ---------------------------------------------------------------------

    def _prepare_thread(self) -> None:
        device = self.device.device
        if device.type != "cuda":
            return
        torch.cuda.set_device(device)
        stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self._streams.stream = stream
        with torch.cuda.stream(stream):
            # The first matmul on a thread creates its cuBLAS handle: keep that off the bill.
            warm = torch.ones(8, 8, device=device)
            (warm @ warm).sum().item()

    def _warm_up(self, barrier: threading.Barrier, turn: threading.Lock) -> None:
        # Every slot's thread holds one call until all have started, so each gets its own; then
        # they take turns: torch's lazy library loads are not thread-safe (two first
        # torch.linalg calls at once raise "lazy wrapper should be called at most once").
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(_WARM_UP_WAIT_S)
        with turn:
            self._warm_up_workloads()

    def _warm_up_workloads(self) -> None:
        for name, fn in self.workloads.items():
            make = example(name, fn)
            if make is None:
                continue
            try:
                inputs, params = make()
                self._execute(name, fn, inputs, params, threading.Event(), self._warm_up_meter)
            except Exception as exc:  # an operator's example: the agent still serves
                logger.warning("warm-up of workload %r failed: %s", name, exc)

    def _execute(
        self,
        name: str,
        fn: Workload,
        inputs: Sequence[torch.Tensor],
        params: Mapping[str, Param],
        cancelled: threading.Event,
        meter: DeviceMeter,
    ) -> RunOutcome:
        if cancelled.is_set():  # cancelled or recalled while it waited for a slot: never start
            raise TaskCancelledError(f"workload {name!r} was cancelled before it started")
        ctx = WorkloadContext(device=self.device.device, cancelled=cancelled)
        started = time.perf_counter()
        try:
            if ctx.device.type == "cuda":
                outcome = self._execute_cuda(name, fn, inputs, params, ctx, meter)
            else:
                outcome = _execute_cpu(name, fn, inputs, params, ctx, meter)
        except AgentError:
            raise
        except Exception as exc:
            # Workloads are operator code and torch raises plain RuntimeErrors (CUDA out of
            # memory too): whatever they raise is the attempt's failure, never the agent's.
            raise WorkloadFailedError(describe_exception(exc, (__file__,))) from exc
        logger.debug(
            "%s: %.6f s compute, %.6f s wall",
            name,
            outcome.compute_seconds,
            time.perf_counter() - started,
        )
        return outcome

    def _call_model(
        self, model: LoadedModel, inputs: Sequence[torch.Tensor], meter: DeviceMeter
    ) -> RunOutcome:
        device = self.device.device
        call, ctx = _model_workload(model), WorkloadContext(device, threading.Event())
        try:
            if device.type == "cuda":
                return self._execute_cuda(model.model_id, call, inputs, {}, ctx, meter)
            return _execute_cpu(model.model_id, call, inputs, {}, ctx, meter)
        except AgentError:
            raise
        except Exception as exc:
            on_device = [t.to(device) for t in inputs]
            raise WorkloadFailedError(describe_model_failure(model.module, on_device, exc)) from exc

    def _execute_cuda(
        self,
        name: str,
        fn: Workload,
        inputs: Sequence[torch.Tensor],
        params: Mapping[str, Param],
        ctx: WorkloadContext,
        meter: DeviceMeter,
    ) -> RunOutcome:
        stream: torch.cuda.Stream = self._streams.stream
        with torch.cuda.stream(stream):
            on_device = [t.to(ctx.device, non_blocking=True) for t in inputs]
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            # The host window holds the events (the GPU reaches start after it is recorded,
            # end before synchronize returns): the share bounds the bill, the events tighten it.
            token = meter.enter()
            try:
                start.record(stream)
                outputs = fn(on_device, params, ctx)
                end.record(stream)
                end.synchronize()
            finally:
                share = meter.leave(token)
            host = _to_host(name, outputs)
        return RunOutcome(host, min(start.elapsed_time(end) / 1000.0, share))


def _model_workload(model: LoadedModel) -> Workload:
    def call(
        inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        return model(*inputs)

    return call


def _execute_cpu(
    name: str,
    fn: Workload,
    inputs: Sequence[torch.Tensor],
    params: Mapping[str, Param],
    ctx: WorkloadContext,
    meter: DeviceMeter,
) -> RunOutcome:
    on_device = [t.to(ctx.device) for t in inputs]
    token = meter.enter()
    try:
        outputs = fn(on_device, params, ctx)
    finally:
        seconds = meter.leave(token)
    return RunOutcome(_to_host(name, outputs), seconds)


def _to_host(name: str, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(outputs, torch.Tensor) or not isinstance(outputs, Sequence):
        raise WorkloadFailedError(
            f"workload {name!r} returned {type(outputs).__name__}, not a sequence of tensors"
        )
    host = []
    for index, tensor in enumerate(outputs):
        if not isinstance(tensor, torch.Tensor):
            raise WorkloadFailedError(
                f"workload {name!r} output {index} is a {type(tensor).__name__}, not a tensor"
            )
        if str(tensor.dtype).removeprefix("torch.") not in DTYPE_ITEMSIZE:
            raise WorkloadFailedError(
                f"workload {name!r} output {index} has dtype {tensor.dtype}, which the wire "
                f"cannot carry"
            )
        # Lazy conjugate/negative views would otherwise be sent as their un-conjugated bytes.
        resolved = tensor.detach().resolve_conj().resolve_neg()
        host.append(resolved.to("cpu").contiguous())
    return tuple(host)

"""Runs workloads on the device and measures their compute time.

The one blocking boundary of the agent: a ``ThreadPoolExecutor`` with one worker per slot.
On CUDA, compute time comes from CUDA events recorded around the workload on the current
stream; on CPU, torch ops are synchronous and a monotonic clock around the call is exact.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from gpu_agent.workloads import Param, Workload, WorkloadContext, lookup, registry

__all__ = ["DeviceInfo", "RunOutcome", "Runner", "detect_device"]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """The device the agent runs on."""

    device: torch.device
    gpu_type: str
    """GCE-style slug, e.g. ``nvidia-l4``; ``cpu`` without a GPU."""
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """A finished workload."""

    outputs: tuple[torch.Tensor, ...]
    """On the CPU, contiguous."""
    compute_seconds: float


_GPU_SLUGS = (
    (r"\bH100\b", "nvidia-h100-80gb"),
    (r"\bA100\b", "nvidia-tesla-a100"),
    (r"\bL4\b", "nvidia-l4"),
    (r"\bT4\b", "nvidia-tesla-t4"),
    (r"\bV100\b", "nvidia-tesla-v100"),
)


def gpu_slug(name: str) -> str:
    """Maps a CUDA device name to the GCE accelerator name it is sold as."""
    for pattern, slug in _GPU_SLUGS:
        if re.search(pattern, name):
            return slug
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def detect_device(choice: str) -> DeviceInfo:
    """Resolves ``auto``/``cpu``/``cuda`` to a device and describes it."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        props = torch.cuda.get_device_properties(0)
        torch.zeros(1, device="cuda").sum().item()  # create the context now, not on billed time
        return DeviceInfo(torch.device("cuda", 0), gpu_slug(props.name), int(props.total_memory))
    if choice not in ("auto", "cpu"):
        raise ValueError(f"device must be auto, cpu or cuda, not {choice!r}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceInfo(torch.device("cpu"), "cpu", int(memory))


class Runner:
    """Executes workloads, at most ``slots`` at a time."""

    def __init__(self, device: DeviceInfo, slots: int) -> None:
        self.device = device
        self.workloads: dict[str, Workload] = registry()
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="workload")

    async def run(
        self,
        workload: str,
        inputs: Sequence[torch.Tensor],
        params: Mapping[str, Param],
        cancelled: threading.Event,
    ) -> RunOutcome:
        """Runs one workload on a worker thread."""
        fn = lookup(workload, self.workloads)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._execute, fn, inputs, params, cancelled
        )

    def close(self) -> None:
        """Waits for running workloads and stops the workers."""
        self._executor.shutdown(wait=True)

    def _execute(
        self,
        fn: Workload,
        inputs: Sequence[torch.Tensor],
        params: Mapping[str, Param],
        cancelled: threading.Event,
    ) -> RunOutcome:
        device = self.device.device
        on_device = [t.to(device, non_blocking=True) for t in inputs]
        ctx = WorkloadContext(device=device, cancelled=cancelled)
        if device.type == "cuda":
            outputs, seconds = _timed_cuda(fn, on_device, params, ctx)
        else:
            start = time.perf_counter()
            outputs = fn(on_device, params, ctx)
            seconds = time.perf_counter() - start
        return RunOutcome(tuple(t.detach().cpu().contiguous() for t in outputs), seconds)


def _timed_cuda(
    fn: Workload, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> tuple[Sequence[torch.Tensor], float]:
    stream = torch.cuda.current_stream(ctx.device)
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record(stream)
    outputs = fn(inputs, params, ctx)
    end.record(stream)
    end.synchronize()
    return outputs, start.elapsed_time(end) / 1000.0

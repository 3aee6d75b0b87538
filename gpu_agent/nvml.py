"""GPU utilization and memory through NVML (``nvidia-ml-py``), when there is a CUDA device.

``nvidia-ml-py`` is an optional dependency (the ``agent`` extra installs it on Linux); without
it, without a driver, or on the CPU, ``GpuProbe.open`` returns None and the agent's
``/metrics`` simply has no GPU gauges. NVML counts devices by PCI order, CUDA by
``CUDA_VISIBLE_DEVICES``: the device is matched by the UUID torch reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GpuProbe", "GpuSample"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU."""

    utilization: float
    """Fraction of the last sample period (1/6 s to 1 s) in which a kernel ran, 0 to 1."""
    memory_used_bytes: int
    memory_total_bytes: int


class GpuProbe:
    """Reads one device through NVML; thread-safe (NVML is)."""

    def __init__(self, nvml: Any, handle: Any, name: str) -> None:
        self._nvml = nvml
        self._handle = handle
        self.name = name
        """The device's name, e.g. ``NVIDIA L4``."""

    @classmethod
    def open(cls, device: torch.device) -> GpuProbe | None:
        """A probe of the CUDA ``device``; None on the CPU or when NVML is not there."""
        if device.type != "cuda":
            return None
        try:
            import pynvml
        except ImportError:
            logger.info("nvidia-ml-py is not installed: no GPU utilization on /metrics")
            return None
        try:
            pynvml.nvmlInit()
            handle = _handle(pynvml, device)
            name = pynvml.nvmlDeviceGetName(handle)
        except pynvml.NVMLError as exc:
            logger.warning("NVML is not usable (%s): no GPU utilization on /metrics", exc)
            return None
        return cls(pynvml, handle, name if isinstance(name, str) else name.decode())

    def sample(self) -> GpuSample | None:
        """The device's utilization and memory now; None if NVML failed this time."""
        nvml = self._nvml
        try:
            rates = nvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except nvml.NVMLError as exc:
            logger.debug("NVML sample failed: %s", exc)
            return None
        return GpuSample(int(rates.gpu) / 100.0, int(memory.used), int(memory.total))


def _handle(nvml: Any, device: torch.device) -> Any:
    index = device.index or 0
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        text = str(uuid)
        try:
            return nvml.nvmlDeviceGetHandleByUUID(
                text if text.startswith("GPU-") else f"GPU-{text}"
            )
        except nvml.NVMLError:
            pass  # MIG slices and old drivers: fall back to the index
    return nvml.nvmlDeviceGetHandleByIndex(index)

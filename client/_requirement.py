"""The ``gpu=`` and ``min_gpu_memory=`` arguments: parsed, checked, and put on the wire.

Memory sizes are bytes as an int, or a string with a unit: decimal (``"24GB"`` is 24 * 10**9)
or binary (``"16GiB"`` is 16 * 2**30), as GPU vendors and ``nvidia-smi`` write them.
"""

from __future__ import annotations

import re

from gpubroker.client._types import GpuRequirement
from gpubroker.protos import task_pb2

__all__ = ["parse_memory", "requirement", "requirement_from_proto", "requirement_to_proto"]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
_MAX_BYTES = 2**63 - 1  # the wire's int64


def parse_memory(value: int | str) -> int:
    """Bytes from an int, or from a string such as ``"16GiB"``, ``"24GB"``, ``"1.5 TiB"``.

    Raises:
        ValueError: A negative or too large size, or a string that is not a number with one of
            the units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (any case).
        TypeError: Neither an int nor a string.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"a memory size is an int of bytes or a string, not {value!r}")
    size = _parse_size(value) if isinstance(value, str) else value
    if not 0 <= size <= _MAX_BYTES:
        raise ValueError(f"a memory size must be 0..{_MAX_BYTES} bytes, got {size}")
    return size


def _parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).lower()) if match is not None else None
    if match is None or unit is None:
        raise ValueError(
            f"cannot read {text!r} as a memory size: write bytes as an int, or a number "
            "with a unit such as '16GiB' or '24GB'"
        )
    number = match.group(1)
    return int(float(number) * unit) if "." in number else int(number) * unit


def requirement(gpu: str | None, min_gpu_memory: int | str | None) -> GpuRequirement | None:
    """The requirement the arguments ask for, or None when they ask for nothing."""
    if gpu is not None and (not isinstance(gpu, str) or not gpu.strip()):
        raise ValueError(f"gpu must be a GPU type such as 'nvidia-l4', not {gpu!r}")
    memory = 0 if min_gpu_memory is None else parse_memory(min_gpu_memory)
    if gpu is None and memory == 0:
        return None
    return GpuRequirement(gpu.strip() if gpu is not None else None, memory)


def requirement_to_proto(value: GpuRequirement) -> task_pb2.GpuRequirement:
    """Converts a requirement (empty fields for no constraint)."""
    return task_pb2.GpuRequirement(
        gpu_type=value.gpu_type or "", min_memory_bytes=value.min_memory_bytes
    )


def requirement_from_proto(msg: task_pb2.GpuRequirement) -> GpuRequirement:
    """Converts a requirement from the wire."""
    return GpuRequirement(msg.gpu_type or None, msg.min_memory_bytes)

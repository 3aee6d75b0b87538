"""Named workloads: the only code an agent runs. Nothing is ever unpickled from the network.

Built-ins are registered here; operators add their own through the ``gpubroker.workloads``
entry-point group (each entry point names a ``Workload`` callable).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

import torch
import torch.nn.functional as F

from gpu_agent.errors import TaskCancelledError, UnknownWorkloadError, WorkloadArgumentError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Param",
    "Workload",
    "WorkloadContext",
    "lookup",
    "register",
    "registry",
]

ENTRY_POINT_GROUP = "gpubroker.workloads"

Param = int | float | str | bool


@dataclass(frozen=True, slots=True)
class WorkloadContext:
    """What a workload may know about where it runs."""

    device: torch.device
    cancelled: threading.Event
    """Set when the attempt is revoked; long workloads should check it."""


class Workload(Protocol):
    """A named computation over input tensors."""

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]: ...


_BUILTINS: dict[str, Workload] = {}


def register(name: str) -> Callable[[Workload], Workload]:
    """Registers a built-in workload under ``name``."""

    def decorate(fn: Workload) -> Workload:
        _BUILTINS[name] = fn
        return fn

    return decorate


def registry() -> dict[str, Workload]:
    """Every workload: built-ins plus those installed as entry points."""
    found = dict(_BUILTINS)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found[entry.name] = entry.load()
    return found


def lookup(name: str, workloads: Mapping[str, Workload]) -> Workload:
    """The workload registered as ``name``."""
    try:
        return workloads[name]
    except KeyError:
        raise UnknownWorkloadError(
            f"unknown workload {name!r}; this agent runs: {', '.join(sorted(workloads))}"
        ) from None


def _arity(name: str, inputs: Sequence[torch.Tensor], low: int, high: int | None = None) -> None:
    high = low if high is None else high
    if not low <= len(inputs) <= high:
        want = str(low) if low == high else f"{low} to {high}"
        raise WorkloadArgumentError(f"{name} takes {want} input tensors, got {len(inputs)}")


def _params(
    name: str, params: Mapping[str, Param], spec: Mapping[str, tuple[type, Param | None]]
) -> dict[str, Param | None]:
    unknown = set(params) - set(spec)
    if unknown:
        raise WorkloadArgumentError(
            f"{name} has no parameter(s) {sorted(unknown)}; it takes {sorted(spec) or 'none'}"
        )
    values: dict[str, Param | None] = {}
    for key, (kind, default) in spec.items():
        value = params.get(key, default)
        if value is not None:
            ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                raise WorkloadArgumentError(
                    f"{name}: parameter {key!r} must be {kind.__name__}, got {value!r}"
                )
        values[key] = value
    return values


def _int(value: Param | None) -> int:
    assert isinstance(value, int)  # _params checked the type
    return value


def _run(name: str, fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    # torch reports bad shapes as RuntimeError; they are the caller's fault, not ours.
    try:
        return [fn()]
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise WorkloadArgumentError(f"{name}: {exc}") from exc


@register("matmul")
def matmul(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``a @ b`` (torch.matmul broadcasting rules)."""
    _arity("matmul", inputs, 2)
    _params("matmul", params, {})
    return _run("matmul", lambda: torch.matmul(inputs[0], inputs[1]))


@register("add")
def add(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``a + b`` with broadcasting."""
    _arity("add", inputs, 2)
    _params("add", params, {})
    return _run("add", lambda: torch.add(inputs[0], inputs[1]))


@register("sum")
def sum_(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """Sum of all elements, or along ``dim`` (with ``keepdim``)."""
    _arity("sum", inputs, 1)
    p = _params("sum", params, {"dim": (int, None), "keepdim": (bool, False)})
    x = inputs[0]
    if p["dim"] is None:
        return _run("sum", lambda: torch.sum(x))
    dim, keepdim = _int(p["dim"]), bool(p["keepdim"])
    return _run("sum", lambda: torch.sum(x, dim=dim, keepdim=keepdim))


@register("conv2d")
def conv2d(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``torch.nn.functional.conv2d(input, weight, bias?)`` with int stride/padding/dilation."""
    _arity("conv2d", inputs, 2, 3)
    spec: dict[str, tuple[type, Param | None]] = {
        "stride": (int, 1), "padding": (int, 0), "dilation": (int, 1), "groups": (int, 1),
    }  # fmt: skip
    p = _params("conv2d", params, spec)
    bias = inputs[2] if len(inputs) == 3 else None
    stride, padding, dilation, groups = (
        _int(p[k]) for k in ("stride", "padding", "dilation", "groups")
    )
    return _run(
        "conv2d",
        lambda: F.conv2d(
            inputs[0],
            inputs[1],
            bias,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
        ),
    )


@register("fft")
def fft(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``torch.fft.fft`` along ``dim`` (default -1), optional ``n`` and ``norm``."""
    _arity("fft", inputs, 1)
    p = _params("fft", params, {"n": (int, None), "dim": (int, -1), "norm": (str, None)})
    n = None if p["n"] is None else _int(p["n"])
    norm = None if p["norm"] is None else str(p["norm"])
    dim = _int(p["dim"])
    return _run("fft", lambda: torch.fft.fft(inputs[0], n=n, dim=dim, norm=norm))


@register("linalg.solve")
def linalg_solve(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``X`` such that ``A @ X = B``."""
    _arity("linalg.solve", inputs, 2)
    _params("linalg.solve", params, {})
    return _run("linalg.solve", lambda: torch.linalg.solve(inputs[0], inputs[1]))


@register("echo")
def echo(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """Returns its inputs unchanged (for transport tests and benchmarks)."""
    _params("echo", params, {})
    return list(inputs)


@register("sleep")
def sleep(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """Waits ``seconds`` (at most an hour), honouring cancellation, then echoes its inputs."""
    p = _params("sleep", params, {"seconds": (float, 0.0)})
    seconds = p["seconds"]
    assert isinstance(seconds, float)
    if not 0 <= seconds <= 3600:
        raise WorkloadArgumentError(f"sleep: seconds must be within 0..3600, got {seconds}")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if ctx.cancelled.wait(min(left, 0.05)):
            raise TaskCancelledError("sleep cancelled")
    return list(inputs)

"""Named workloads: the only code an agent runs. Nothing is ever unpickled from the network.

Built-ins are registered here with ``@register(name)``; operators add their own through the
``gpubroker.workloads`` entry-point group (each entry point names a ``Workload`` callable).
Every built-in validates its inputs and params first and raises ``WorkloadArgumentError``
with the offending numbers, so a caller's mistake is reported as INVALID_ARGUMENT rather than
as whatever torch raises deep inside a kernel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F

from gpubroker.gpu_agent.errors import (
    TaskCancelledError,
    UnknownWorkloadError,
    WorkloadArgumentError,
    WorkloadLoadError,
)
from gpubroker.protos.modelfile import WORKLOAD_PREFIX
from gpubroker.protos.wire import Param

# Param is part of what a workload author writes against (``Workload.__call__``'s ``params``).
__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_SLEEP_S",
    "Param",
    "Workload",
    "WorkloadContext",
    "broken_workload",
    "example",
    "load_workloads",
    "lookup",
    "register",
    "registry",
]

ENTRY_POINT_GROUP = "gpubroker.workloads"
"""Entry-point group operators install their own workloads under."""

MAX_SLEEP_S = 3600.0
"""Longest ``sleep`` a task may ask for."""

_SLEEP_STEP_S = 0.05  # how quickly ``sleep`` notices a cancel
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPLEX = (torch.complex64, torch.complex128)
_FFT_NORMS = ("backward", "forward", "ortho")


@dataclass(frozen=True, slots=True)
class WorkloadContext:
    """What a workload may know about where it runs."""

    device: torch.device
    """Where the inputs are and where outputs should be computed."""
    cancelled: threading.Event
    """Set when the attempt is revoked or its deadline passed; long workloads should poll it."""


class Workload(Protocol):
    """A named computation over input tensors; returns its outputs."""

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]: ...


W = TypeVar("W", bound=Workload)

Example = Callable[[], tuple[list[torch.Tensor], dict[str, Param]]]
"""Makes small inputs and params for one warm-up call of a workload (``Runner.warm_up``)."""

_BUILTINS: dict[str, Workload] = {}
_EXAMPLES: dict[str, Example] = {}


def register(name: str, example: Example | None = None) -> Callable[[W], W]:
    """Registers a built-in workload under ``name``, with its warm-up call if it has one."""

    def decorate(fn: W) -> W:
        if name in _BUILTINS:
            raise ValueError(f"a workload named {name!r} is already registered")
        _BUILTINS[name] = fn
        if example is not None:
            _EXAMPLES[name] = example
        return fn

    return decorate


def example(name: str, fn: Workload) -> Example | None:
    """The warm-up call of workload ``name``: a built-in's, or an ``example`` attribute an
    operator's workload may carry (a callable returning ``(inputs, params)``); None without."""
    found = _EXAMPLES.get(name) if _BUILTINS.get(name) is fn else None
    return found or getattr(fn, "example", None)


def registry() -> dict[str, Workload]:
    """Every workload: the built-ins plus those installed as ``gpubroker.workloads`` entry points.

    Raises:
        WorkloadLoadError: an entry point fails to import (whatever its import raises), is not
            callable, reuses the name of a built-in, or takes a name of the form that runs an
            uploaded model (``model:...``).
    """
    found, problems = load_workloads()
    if problems:
        raise WorkloadLoadError(next(iter(problems.values())))
    return found


def load_workloads() -> tuple[dict[str, Workload], dict[str, str]]:
    """The workloads that load, and why each entry point that does not was refused (by its
    name), as ``registry`` but without raising: an agent serves what loads and reports the rest.

    A refused entry point's name is in the workloads only when a built-in holds it; otherwise
    ``broken_workload`` stands in for it, so a task naming it fails saying why.
    """
    found: dict[str, Workload] = dict(_BUILTINS)
    problems: dict[str, str] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name.startswith(WORKLOAD_PREFIX):
            problems[entry.name] = (
                f"entry point {entry.value!r} is named {entry.name!r}; names starting with "
                f"{WORKLOAD_PREFIX!r} run users' uploaded models"
            )
        elif entry.name in found:
            problems[entry.name] = (
                f"entry point {entry.value!r} reuses the workload name {entry.name!r}"
            )
        else:
            try:
                loaded = entry.load()
            except Exception as exc:  # an operator's package: any import-time error is its own
                problems[entry.name] = f"entry point {entry.value!r} failed to load: {exc}"
                continue
            if callable(loaded):
                found[entry.name] = loaded
            else:
                problems[entry.name] = f"entry point {entry.value!r} is not callable"
    return found, problems


def broken_workload(name: str, problem: str) -> Workload:
    """A stand-in for a workload whose entry point was refused: it raises ``WorkloadLoadError``
    saying why, which fails the task with FAILED_PRECONDITION instead of leaving it queued."""

    def refuse(
        inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        raise WorkloadLoadError(f"workload {name!r} could not be loaded on this agent: {problem}")

    return refuse


def lookup(name: str, workloads: Mapping[str, Workload] | None = None) -> Workload:
    """The workload registered as ``name`` (in ``workloads``, or in ``registry()``)."""
    known = registry() if workloads is None else workloads
    try:
        return known[name]
    except KeyError:
        raise UnknownWorkloadError(
            f"unknown workload {name!r}; this agent runs: {', '.join(sorted(known))}"
        ) from None


# -- validation helpers -----------------------------------------------------------------------


class _Params:
    """Typed access to a workload's params; ``_params`` has already refused unknown names."""

    def __init__(self, workload: str, values: Mapping[str, Param]) -> None:
        self._workload = workload
        self._values = values

    def integer(self, key: str, default: int) -> int:
        value = self.optional_integer(key)
        return default if value is None else value

    def optional_integer(self, key: str) -> int | None:
        value = self._values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self._wrong_type(key, "an integer", value)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._values.get(key, default)
        if not isinstance(value, bool):
            raise self._wrong_type(key, "a boolean", value)
        return value

    def number(self, key: str, default: float) -> float:
        value = self._values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong_type(key, "a number", value)
        return float(value)

    def optional_choice(self, key: str, choices: Sequence[str]) -> str | None:
        value = self._values.get(key)
        if value is not None and value not in choices:
            raise self._wrong_type(key, f"one of {', '.join(choices)}", value)
        return value if isinstance(value, str) else None

    def _wrong_type(self, key: str, expected: str, value: object) -> WorkloadArgumentError:
        return WorkloadArgumentError(
            f"{self._workload}: parameter {key!r} must be {expected}, got {value!r}"
        )


def _params(workload: str, params: Mapping[str, Param], allowed: Iterable[str] = ()) -> _Params:
    allowed = sorted(allowed)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no parameters"
        raise WorkloadArgumentError(
            f"{workload}: unknown parameter(s) {', '.join(unknown)}; it takes {takes}"
        )
    return _Params(workload, params)


def _arity(
    workload: str, inputs: Sequence[torch.Tensor], low: int, high: int | None = None
) -> None:
    high = low if high is None else high
    if not low <= len(inputs) <= high:
        want = str(low) if low == high else f"{low} to {high}"
        raise WorkloadArgumentError(f"{workload} takes {want} input tensors, got {len(inputs)}")


def _dtypes(workload: str, tensors: Sequence[torch.Tensor], allowed: Sequence[torch.dtype]) -> None:
    names = [_dtype_name(t.dtype) for t in tensors]
    if any(t.dtype not in allowed for t in tensors):
        allowed_names = ", ".join(_dtype_name(d) for d in allowed)
        raise WorkloadArgumentError(
            f"{workload}: inputs must be {allowed_names}; got {', '.join(names)}"
        )
    if len(set(names)) > 1:
        raise WorkloadArgumentError(
            f"{workload}: inputs must share a dtype; got {', '.join(names)}"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _broadcast(workload: str, a: Sequence[int], b: Sequence[int], what: str = "shapes") -> None:
    try:
        torch.broadcast_shapes(torch.Size(a), torch.Size(b))  # type: ignore[no-untyped-call]
    except RuntimeError:
        raise WorkloadArgumentError(
            f"{workload}: {what} {list(a)} and {list(b)} do not broadcast"
        ) from None


def _dim(workload: str, dim: int, tensor: torch.Tensor) -> int:
    rank = max(tensor.dim(), 1)  # torch lets a 0-d tensor use dim 0 or -1
    if not -rank <= dim < rank:
        raise WorkloadArgumentError(
            f"{workload}: dim {dim} is out of range for a tensor of shape {list(tensor.shape)}"
        )
    return dim


def _at_least(workload: str, **bounds: tuple[int, int]) -> None:
    """Checks ``name=(value, minimum)`` pairs."""
    for name, (value, minimum) in bounds.items():
        if value < minimum:
            raise WorkloadArgumentError(
                f"{workload}: {name} must be at least {minimum}, got {value}"
            )


# -- built-ins --------------------------------------------------------------------------------


@register("matmul", example=lambda: ([torch.ones(256, 256), torch.ones(256, 256)], {}))
def matmul(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``a @ b`` with ``torch.matmul``'s 1-d and batch broadcasting rules."""
    _arity("matmul", inputs, 2)
    _params("matmul", params)
    a, b = inputs
    _dtypes("matmul", inputs, _FLOATING + _COMPLEX)
    if a.dim() == 0 or b.dim() == 0:
        raise WorkloadArgumentError(
            f"matmul: inputs need at least 1 dimension; got shapes {list(a.shape)} and "
            f"{list(b.shape)}"
        )
    columns, rows = a.shape[-1], (b.shape[-2] if b.dim() >= 2 else b.shape[0])
    if columns != rows:
        raise WorkloadArgumentError(
            f"matmul: a of shape {list(a.shape)} has {columns} columns but b of shape "
            f"{list(b.shape)} has {rows} rows"
        )
    _broadcast("matmul", a.shape[:-2], b.shape[:-2], "batch dimensions")
    return [torch.matmul(a, b)]


@register("add", example=lambda: ([torch.ones(4), torch.ones(4)], {}))
def add(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``a + b`` with broadcasting and torch's type promotion."""
    _arity("add", inputs, 2)
    _params("add", params)
    a, b = inputs
    _broadcast("add", a.shape, b.shape)
    return [torch.add(a, b)]


@register("sum", example=lambda: ([torch.ones(1 << 20)], {}))
def sum_(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """Sum of all elements, or along ``dim`` (int), keeping it when ``keepdim`` (bool)."""
    _arity("sum", inputs, 1)
    p = _params("sum", params, ("dim", "keepdim"))
    (x,) = inputs
    dim, keepdim = p.optional_integer("dim"), p.boolean("keepdim", False)
    if dim is None:
        return [torch.sum(x, dim=None, keepdim=keepdim)]
    return [torch.sum(x, dim=_dim("sum", dim, x), keepdim=keepdim)]


@register(
    "conv2d", example=lambda: ([torch.ones(2, 3, 32, 32), torch.ones(4, 3, 3, 3)], {"padding": 1})
)
def conv2d(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``torch.nn.functional.conv2d(input, weight, bias?)``; int stride/padding/dilation/groups."""
    _arity("conv2d", inputs, 2, 3)
    p = _params("conv2d", params, ("stride", "padding", "dilation", "groups"))
    stride, padding = p.integer("stride", 1), p.integer("padding", 0)
    dilation, groups = p.integer("dilation", 1), p.integer("groups", 1)
    _at_least("conv2d", stride=(stride, 1), padding=(padding, 0), dilation=(dilation, 1))
    _at_least("conv2d", groups=(groups, 1))
    _dtypes("conv2d", inputs, _FLOATING + _COMPLEX)
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) == 3 else None
    _conv2d_shapes(x, weight, bias, groups)
    _conv2d_window(x, weight, padding, dilation)
    return [
        F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
    ]


def _conv2d_shapes(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
) -> None:
    if x.dim() not in (3, 4) or weight.dim() != 4:
        raise WorkloadArgumentError(
            f"conv2d: input must be 3-d or 4-d and weight 4-d; got shapes {list(x.shape)} "
            f"and {list(weight.shape)}"
        )
    in_channels, out_channels = x.shape[-3], weight.shape[0]
    if in_channels != weight.shape[1] * groups or out_channels % groups:
        raise WorkloadArgumentError(
            f"conv2d: input has {in_channels} channels and weight of shape "
            f"{list(weight.shape)} with groups={groups} expects {weight.shape[1] * groups} "
            f"input channels and a multiple of {groups} output channels"
        )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise WorkloadArgumentError(
            f"conv2d: bias must have shape [{out_channels}], got {list(bias.shape)}"
        )


def _conv2d_window(x: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int) -> None:
    for size, kernel in zip(x.shape[-2:], weight.shape[-2:], strict=True):
        span = dilation * (kernel - 1) + 1
        if span > size + 2 * padding:
            raise WorkloadArgumentError(
                f"conv2d: kernel of shape {list(weight.shape[-2:])} with dilation {dilation} "
                f"spans {span} but the padded input is {size + 2 * padding} wide "
                f"(input shape {list(x.shape)}, padding {padding})"
            )


@register("fft", example=lambda: ([torch.ones(4, 1024)], {}))
def fft(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``torch.fft.fft`` along ``dim`` (default -1), optional ``n`` and ``norm``; complex output."""
    _arity("fft", inputs, 1)
    p = _params("fft", params, ("dim", "n", "norm"))
    (x,) = inputs
    n, dim = p.optional_integer("n"), p.integer("dim", -1)
    norm = p.optional_choice("norm", _FFT_NORMS)
    if x.dim() == 0:
        raise WorkloadArgumentError("fft: input must have at least 1 dimension, got a 0-d tensor")
    if x.dtype in (torch.float16, torch.bfloat16):
        raise WorkloadArgumentError(f"fft: {_dtype_name(x.dtype)} input is not supported")
    if n is not None:
        _at_least("fft", n=(n, 1))
    return [torch.fft.fft(x, n=n, dim=_dim("fft", dim, x), norm=norm)]


@register(
    "linalg.solve",
    example=lambda: (
        [torch.eye(32, dtype=torch.float64), torch.ones(32, 2, dtype=torch.float64)],
        {},
    ),
)
def linalg_solve(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """``X`` such that ``A @ X = B`` (``torch.linalg.solve``, batches broadcast)."""
    _arity("linalg.solve", inputs, 2)
    _params("linalg.solve", params)
    _dtypes("linalg.solve", inputs, (torch.float32, torch.float64, *_COMPLEX))
    a, b = inputs
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise WorkloadArgumentError(
            f"linalg.solve: A must be a (batch of) square matrices, got shape {list(a.shape)}"
        )
    # torch's rule: B is a (batch of) vector(s) when it is 1-d or has A's shape minus one dim.
    is_vector = b.dim() == 1 or (b.dim() == a.dim() - 1 and b.shape == a.shape[:-1])
    if b.dim() < 1 or (not is_vector and b.dim() < 2):
        raise WorkloadArgumentError(f"linalg.solve: B must be at least 1-d, got {list(b.shape)}")
    rows, batch = (b.shape[-1], b.shape[:-1]) if is_vector else (b.shape[-2], b.shape[:-2])
    if rows != a.shape[-1]:
        raise WorkloadArgumentError(
            f"linalg.solve: A of shape {list(a.shape)} needs B with {a.shape[-1]} rows, "
            f"got B of shape {list(b.shape)}"
        )
    _broadcast("linalg.solve", a.shape[:-2], batch, "batch dimensions")
    try:
        return [torch.linalg.solve(a, b)]
    except torch.linalg.LinAlgError as exc:  # type: ignore[attr-defined]
        raise WorkloadArgumentError(f"linalg.solve: {exc}") from exc


@register("echo")
def echo(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """Returns its inputs unchanged, any number and any dtype (transport tests, benchmarks)."""
    _params("echo", params)
    return list(inputs)


@register("sleep")
def sleep(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    """Waits ``seconds`` (at most an hour), stopping early when cancelled; returns its inputs."""
    p = _params("sleep", params, ("seconds",))
    seconds = p.number("seconds", 0.0)
    if not 0 <= seconds <= MAX_SLEEP_S:  # also refuses NaN
        raise WorkloadArgumentError(
            f"sleep: seconds must be within 0..{MAX_SLEEP_S:g}, got {seconds}"
        )
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if ctx.cancelled.wait(min(left, _SLEEP_STEP_S)):
            raise TaskCancelledError(f"sleep cancelled with {left:.3f} of {seconds} s left")
    return list(inputs)

"""Checks of a task's inputs and params; every refusal is a ``WorkloadArgumentError``.

The agent reports ``WorkloadArgumentError`` as INVALID_ARGUMENT, the caller's mistake, with
this message. Anything else a workload raises is reported as ABORTED (a failure of the workload
itself), so a workload checks everything it can before torch sees the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gpubroker.gpu_agent.errors import WorkloadArgumentError
from gpubroker.gpu_agent.workloads import Param

__all__ = ["FLOATING", "Params", "checked_params", "dtype_name", "normalized_dim", "single_input"]

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The real floating-point dtypes the wire carries."""


class Params:
    """Typed access to a task's params, whose names ``checked_params`` has already checked."""

    def __init__(self, workload: str, values: Mapping[str, Param]) -> None:
        self._workload = workload
        self._values = values

    def integer(self, key: str, default: int | None = None) -> int:
        """The int param ``key``; ``default`` when absent, required when that is None."""
        value = self._values.get(key, default)
        if value is None:
            raise WorkloadArgumentError(f"{self._workload}: parameter {key!r} is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong_type(key, "an integer", value)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """The bool param ``key``; ``default`` when absent."""
        value = self._values.get(key, default)
        if not isinstance(value, bool):
            raise self._wrong_type(key, "a boolean", value)
        return value

    def choice(self, key: str, choices: Sequence[str]) -> str:
        """The str param ``key``, one of ``choices``; the first of them when absent."""
        value = self._values.get(key, choices[0])
        if not isinstance(value, str) or value not in choices:
            raise self._wrong_type(key, f"one of {', '.join(map(repr, choices))}", value)
        return value

    def _wrong_type(self, key: str, expected: str, value: object) -> WorkloadArgumentError:
        return WorkloadArgumentError(
            f"{self._workload}: parameter {key!r} must be {expected}, got {value!r}"
        )


def checked_params(workload: str, values: Mapping[str, Param], allowed: Sequence[str]) -> Params:
    """``values`` as ``Params``, after refusing any name not in ``allowed``."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise WorkloadArgumentError(
            f"{workload}: unknown parameter(s) {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(allowed))}"
        )
    return Params(workload, values)


def single_input(
    workload: str, inputs: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]
) -> torch.Tensor:
    """The one input tensor, refused unless there is exactly one and its dtype is in ``dtypes``."""
    if len(inputs) != 1:
        raise WorkloadArgumentError(f"{workload} takes 1 input tensor, got {len(inputs)}")
    (x,) = inputs
    if x.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise WorkloadArgumentError(
            f"{workload}: input must be {allowed}; got {dtype_name(x.dtype)}"
        )
    return x


def normalized_dim(workload: str, dim: int, x: torch.Tensor) -> int:
    """``dim`` as a non-negative index into ``x``'s shape (a 0-d tensor has one, of size 1)."""
    rank = max(x.dim(), 1)
    if not -rank <= dim < rank:
        raise WorkloadArgumentError(
            f"{workload}: dim {dim} is out of range for a tensor of shape {list(x.shape)}"
        )
    return dim % rank


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: the dtype names the wire uses."""
    return str(dtype).removeprefix("torch.")

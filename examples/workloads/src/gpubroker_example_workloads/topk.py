"""``example.topk``: the ``k`` largest (or smallest) entries along one dimension, with indices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gpubroker.gpu_agent.errors import WorkloadArgumentError
from gpubroker.gpu_agent.workloads import Param, WorkloadContext
from gpubroker_example_workloads._checks import (
    FLOATING,
    checked_params,
    normalized_dim,
    single_input,
)

__all__ = ["TopK", "topk"]

NAME = "example.topk"
REAL = (*FLOATING, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
"""Dtypes with an order ``topk`` can sort by (neither bool nor complex)."""


class TopK:
    """``torch.topk`` of one real tensor: ``k`` (int, required) entries along ``dim`` (default
    -1), the largest unless ``largest`` is false, sorted. Returns two tensors: the values (the
    input's dtype) and their int64 indices along ``dim``, both the input's shape with ``dim``
    cut to ``k``."""

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> list[torch.Tensor]:
        """Runs the workload (the agent's ``Workload`` signature)."""
        x = single_input(NAME, inputs, REAL)
        p = checked_params(NAME, params, ("dim", "k", "largest"))
        dim, k = normalized_dim(NAME, p.integer("dim", -1), x), p.integer("k")
        size = x.shape[dim] if x.dim() else 1
        if not 0 <= k <= size:
            raise WorkloadArgumentError(
                f"{NAME}: k must be within 0..{size} (the size of dim {dim} of a tensor of "
                f"shape {list(x.shape)}), got {k}"
            )
        values, indices = torch.topk(x, k, dim=dim, largest=p.boolean("largest", True))
        return [values, indices]

    def example(self) -> tuple[list[torch.Tensor], dict[str, Param]]:
        """A warm-up call: the top 10 of each of 32 rows of 4,096 scores."""
        return [torch.linspace(-1.0, 1.0, 32 * 4096).reshape(32, 4096)], {"k": 10}


topk = TopK()
"""The ``example.topk`` entry point."""

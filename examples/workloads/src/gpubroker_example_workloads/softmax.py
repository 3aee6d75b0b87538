"""``example.softmax``: softmax (or log-softmax) along one dimension, computed with care."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gpubroker.gpu_agent.workloads import Param, WorkloadContext
from gpubroker_example_workloads._checks import (
    FLOATING,
    checked_params,
    normalized_dim,
    single_input,
)

__all__ = ["Softmax", "softmax"]

NAME = "example.softmax"


class Softmax:
    """Softmax of one floating tensor along ``dim`` (int, default -1); log-softmax if ``log``.

    Careful where a textbook formula is not: float16 and bfloat16 are computed in float32 and
    rounded once at the end; the largest element of each slice is subtracted before ``exp``, so
    nothing overflows; the log form is ``x - max - log(sum(exp(x - max)))``, exact for tiny
    probabilities that a ``log`` of the softmax would round to ``-inf``. A slice that is all
    ``-inf`` (fully masked) gives zeros (``-inf`` with ``log``) rather than torch's NaN.
    The output has the input's shape and dtype.
    """

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> list[torch.Tensor]:
        """Runs the workload (the agent's ``Workload`` signature)."""
        x = single_input(NAME, inputs, FLOATING)
        p = checked_params(NAME, params, ("dim", "log"))
        dim, log = normalized_dim(NAME, p.integer("dim", -1), x), p.boolean("log", False)
        if x.numel() == 0:
            return [torch.empty_like(x)]
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        peak = work.amax(dim=dim, keepdim=True)
        # A fully masked slice has peak -inf, and -inf - -inf is NaN: shift it by 0 instead.
        shifted = work - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        total = shifted.exp().sum(dim=dim, keepdim=True)
        masked = total == 0
        if log:
            out = torch.where(masked, float("-inf"), shifted - total.log())
        else:
            out = torch.where(masked, 0.0, shifted.exp() / total)
        return [out.to(x.dtype)]

    def example(self) -> tuple[list[torch.Tensor], dict[str, Param]]:
        """A warm-up call: a batch of 64 rows of 1,000 logits."""
        return [torch.linspace(-5.0, 5.0, 64_000).reshape(64, 1000)], {"dim": 1}


softmax = Softmax()
"""The ``example.softmax`` entry point."""

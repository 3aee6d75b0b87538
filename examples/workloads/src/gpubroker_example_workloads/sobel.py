"""``example.sobel``: the Sobel edge filter over images, one channel at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from gpubroker.gpu_agent.errors import WorkloadArgumentError
from gpubroker.gpu_agent.workloads import Param, WorkloadContext
from gpubroker_example_workloads._checks import FLOATING, checked_params, single_input

__all__ = ["Sobel", "sobel"]

NAME = "example.sobel"
PADDINGS = ("replicate", "reflect", "zeros")
"""How the border is extended (the first is the default)."""
MODES = ("magnitude", "gradients")
"""What the workload returns (the first is the default)."""

# d/dx: right column minus left, rows weighted 1-2-1; d/dy is its transpose (down is +y).
_GX = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


class Sobel:
    """Sobel gradients of images shaped ``[H, W]``, ``[C, H, W]`` or ``[N, C, H, W]``.

    Each channel is filtered on its own (every channel of every image is one item of a single
    ``conv2d`` batch), the border extended by ``padding`` (``replicate``, ``reflect`` or
    ``zeros``), so outputs keep the input's shape and dtype. ``mode`` is ``magnitude`` (one
    tensor, ``hypot(gx, gy)``, which cannot overflow where squaring could) or ``gradients``
    (two tensors, ``gx`` then ``gy``). The kernels are not normalised: a step of height 1 gives
    a gradient of 4. float16 and bfloat16 are computed in float32; float32 on a GPU may run in
    TF32 (torch's cuDNN default), so send float64 where the last bits matter.
    """

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> list[torch.Tensor]:
        """Runs the workload (the agent's ``Workload`` signature)."""
        x = single_input(NAME, inputs, FLOATING)
        p = checked_params(NAME, params, ("mode", "padding"))
        padding, mode = p.choice("padding", PADDINGS), p.choice("mode", MODES)
        _check_image(x, padding)
        planes = x.reshape(-1, 1, *x.shape[-2:])  # every channel of every image: [N*C, 1, H, W]
        work = planes.float() if x.dtype in (torch.float16, torch.bfloat16) else planes
        if padding == "zeros":
            padded = F.pad(work, (1, 1, 1, 1))
        else:
            padded = F.pad(work, (1, 1, 1, 1), mode=padding)
        gx_kernel = torch.tensor(_GX, dtype=work.dtype, device=work.device)
        weight = torch.stack([gx_kernel, gx_kernel.T]).unsqueeze(1)  # [2, 1, 3, 3]
        gx, gy = F.conv2d(padded, weight).unbind(dim=1)
        if mode == "magnitude":
            return [torch.hypot(gx, gy).reshape(x.shape).to(x.dtype)]
        return [g.reshape(x.shape).to(x.dtype) for g in (gx, gy)]

    def example(self) -> tuple[list[torch.Tensor], dict[str, Param]]:
        """A warm-up call: a batch of two RGB 64 x 64 images."""
        return [torch.linspace(0.0, 1.0, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)], {}


def _check_image(x: torch.Tensor, padding: str) -> None:
    if x.dim() not in (2, 3, 4):
        raise WorkloadArgumentError(
            f"{NAME}: input must be [H, W], [C, H, W] or [N, C, H, W]; got shape {list(x.shape)}"
        )
    # reflect mirrors the row next to the border, so each side needs two pixels.
    least = 2 if padding == "reflect" else 1
    height, width = x.shape[-2:]
    if height < least or width < least:
        raise WorkloadArgumentError(
            f"{NAME}: images must be at least {least} x {least} pixels with padding "
            f"{padding!r}; got {height} x {width}"
        )


sobel = Sobel()
"""The ``example.sobel`` entry point."""

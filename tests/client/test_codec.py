"""Every tensor torch can hold goes through the codec, however it is laid out in memory."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gpubroker.client.codec import decode, encode

LAYOUTS: dict[str, Callable[[torch.dtype], torch.Tensor]] = {
    # torch calls these contiguous, but their last stride is not 1 (a dim of size 1)
    "every fourth of four": lambda d: torch.arange(4).to(d)[::4],
    "corner of a transpose": lambda d: torch.arange(15).reshape(3, 5).to(d).T[:1, :1],
    "column slice, every other row": lambda d: torch.arange(8).reshape(4, 2).to(d)[:, :1][::2],
    "transpose": lambda d: torch.arange(6).reshape(2, 3).to(d).T,
    "scalar": lambda d: torch.tensor(3).to(d),
}
WIDE_DTYPES = [torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16]
WIDE_DTYPES += [torch.float32, torch.float64, torch.complex64, torch.complex128]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", WIDE_DTYPES, ids=str)
def test_a_tensor_of_any_layout_round_trips_bit_exact(layout: str, dtype: torch.dtype) -> None:
    tensor = LAYOUTS[layout](dtype)

    meta, data = encode(tensor)
    back = decode(meta, bytearray(data))

    assert isinstance(back, torch.Tensor)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)  # no NaN here, so equal values are equal bits


@pytest.mark.parametrize("view", ["conj", "neg"])
def test_a_conjugate_or_negative_view_sends_its_values(view: str) -> None:
    base = torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64)
    tensor = base.conj() if view == "conj" else torch._neg_view(base)

    meta, data = encode(tensor)
    back = decode(meta, bytearray(data))

    assert isinstance(back, torch.Tensor)
    assert torch.equal(back, tensor.resolve_conj().resolve_neg())

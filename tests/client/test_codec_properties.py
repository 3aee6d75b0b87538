"""Property tests of the codec: any tensor torch or numpy can make is sent as its values.

Hypothesis draws a dtype (every wire dtype), a shape (0-d and zero-size included) and a chain of
views (transposes, strided and reversed slices, expansions, conjugate and negative views,
byte order). The bytes sent must equal those of the tensor's plain C-order copy, and decoding
them must give the tensor's values back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpubroker.client.codec import decode, encode
from gpubroker.protos.wire import DTYPE_ITEMSIZE

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)

SHAPES = st.lists(st.integers(0, 4), max_size=4).map(tuple)
NUMPY_DTYPES = sorted(name for name in DTYPE_ITEMSIZE if name != "bfloat16")


def _values(shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """Distinct, NaN-free float64 values, so equal values mean equal bits."""
    count = int(np.prod(shape, dtype=np.int64))
    return (torch.arange(count, dtype=torch.float64) - offset).reshape(shape)


def _torch_tensor(dtype_name: str, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    base = _values(shape, offset)
    dtype = getattr(torch, dtype_name)
    if dtype.is_complex:
        return torch.complex(base, -2 * base).to(dtype)
    if dtype is torch.bool:
        return base.remainder(3) == 0
    if dtype is torch.uint8:
        return base.remainder(256).to(dtype)
    return base.to(dtype)


@st.composite
def torch_views(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of any wire dtype, reached through a chain of views of a fresh one."""
    tensor = _torch_tensor(draw(st.sampled_from(sorted(DTYPE_ITEMSIZE))), draw(SHAPES), 3)
    for _ in range(draw(st.integers(0, 3))):
        tensor = draw(st.sampled_from(_TORCH_VIEWS))(tensor, draw)
    if tensor.is_complex() and draw(st.booleans()):
        tensor = tensor.conj()
    if tensor.dtype not in (torch.bool, torch.uint8) and draw(st.booleans()):
        tensor = torch._neg_view(tensor)
    return tensor


def _permute(tensor: torch.Tensor, draw: st.DrawFn) -> torch.Tensor:
    return tensor.permute(draw(st.permutations(range(tensor.dim()))))


def _slice(tensor: torch.Tensor, draw: st.DrawFn) -> torch.Tensor:
    if tensor.dim() == 0:
        return tensor
    dim = draw(st.integers(0, tensor.dim() - 1))
    start = draw(st.integers(0, tensor.shape[dim]))
    step = draw(st.integers(1, 4))  # a step past the end leaves a size-1 dim with its stride
    return tensor.narrow(dim, start, tensor.shape[dim] - start)[
        (slice(None),) * dim + (slice(None, None, step),)
    ]


def _expand(tensor: torch.Tensor, draw: st.DrawFn) -> torch.Tensor:
    return tensor.unsqueeze(0).expand(draw(st.integers(0, 3)), *tensor.shape)  # stride 0


def _flip(tensor: torch.Tensor, draw: st.DrawFn) -> torch.Tensor:
    return tensor.flip(list(range(tensor.dim()))) if tensor.dim() else tensor


_TORCH_VIEWS = (_permute, _slice, _expand, _flip)


def _torch_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of the tensor's values in C order, found without the codec."""
    values = tensor.resolve_conj().resolve_neg()
    if values.dtype is torch.bfloat16:
        values = values.view(torch.int16)  # numpy has no bfloat16; same bits
    return bytes(values.numpy().tobytes())


def _signs_of_zero_may_differ(tensor: torch.Tensor) -> bool:
    """torch negates a complex value as 0 - z on some paths, so the sign of a zero part of a
    negative complex view depends on its layout (``resolve_neg`` of a transposed view gives
    +0.0 where a contiguous one gives -0.0): only the values can be compared."""
    return tensor.is_complex() and tensor.is_neg()


@PROPERTY_SETTINGS
@given(torch_views())
def test_any_torch_tensor_is_sent_as_its_values_and_decodes_back(tensor: torch.Tensor) -> None:
    meta, data = encode(tensor)
    back = decode(meta, bytearray(data))

    if not _signs_of_zero_may_differ(tensor):
        assert bytes(data) == _torch_bytes(tensor)
    assert (meta.dtype, meta.shape, meta.nbytes) == (
        str(tensor.dtype).removeprefix("torch."),
        tuple(tensor.shape),
        tensor.numel() * tensor.element_size(),
    )
    assert isinstance(back, torch.Tensor) and back.dtype == tensor.dtype
    assert torch.equal(back, tensor.resolve_conj().resolve_neg())


@st.composite
def numpy_views(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    """An array of any numpy wire dtype and either byte order, through a chain of views."""
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(draw(st.sampled_from("<>")))
    array = _torch_tensor(dtype.name, draw(SHAPES), 5).numpy().astype(dtype)
    for _ in range(draw(st.integers(0, 3))):
        if array.ndim == 0:
            break
        if draw(st.booleans()):
            array = array.transpose(draw(st.permutations(range(array.ndim))))
        else:
            axis = draw(st.integers(0, array.ndim - 1))
            step = draw(st.sampled_from([-3, -2, -1, 1, 2, 3]))  # negative strides too
            array = array[(slice(None),) * axis + (slice(None, None, step),)]
    return array


@PROPERTY_SETTINGS
@given(numpy_views())
def test_any_numpy_array_is_sent_little_endian_in_c_order_and_decodes_back(
    array: np.ndarray[Any, Any],
) -> None:
    meta, data = encode(array)
    back = decode(meta, bytearray(data), "numpy")

    little = array.dtype.newbyteorder("<")
    assert bytes(data) == np.ascontiguousarray(array, dtype=little).tobytes()
    assert (meta.dtype, meta.shape) == (array.dtype.name, array.shape)
    assert isinstance(back, np.ndarray) and back.dtype == little
    assert np.array_equal(back, array)


@pytest.mark.parametrize(
    "value", [np.float64(2.5), np.array(2.5, "<f8"), np.array(2.5, ">f8")], ids=repr
)
def test_a_numpy_scalar_or_0_d_array_is_sent_as_a_0_d_array(value: Any) -> None:
    meta, data = encode(value)

    assert meta.shape == () and bytes(data) == np.float64(2.5).astype("<f8").tobytes()

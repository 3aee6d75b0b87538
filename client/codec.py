"""Converts torch tensors and numpy arrays to wire buffers and back, bit-exact.

Encoding makes at most one copy (only for non-contiguous or big-endian input); decoding wraps
the reassembled buffer with ``numpy.frombuffer``/``torch.frombuffer`` without copying.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

from gpubroker.protos.wire import (
    DTYPE_ITEMSIZE,
    INLINE_MAX_BYTES,
    Buffer,
    TensorMeta,
    WireError,
    crc32c,
)

if TYPE_CHECKING:
    import torch

__all__ = ["ArrayLike", "OutputKind", "decode", "empty_buffer", "encode", "is_torch"]

ArrayLike: TypeAlias = "torch.Tensor | np.ndarray[Any, Any]"
"""What the client accepts and returns: a torch tensor or a numpy array."""

OutputKind = Literal["torch", "numpy"]

_NUMPY_DTYPE: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<") for name in DTYPE_ITEMSIZE if name != "bfloat16"
}


def is_torch(value: object) -> bool:
    """Tells whether ``value`` is a torch tensor, without importing torch."""
    return type(value).__module__.startswith("torch") and hasattr(value, "untyped_storage")


def encode(value: ArrayLike, name: str = "") -> tuple[TensorMeta, memoryview]:
    """Returns the header and the raw bytes of a tensor or array."""
    if is_torch(value):
        return _encode_torch(value, name)  # type: ignore[arg-type]
    if isinstance(value, np.ndarray | np.generic):
        return _encode_numpy(np.asarray(value), name)
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def _encode_numpy(array: np.ndarray[Any, Any], name: str) -> tuple[TensorMeta, memoryview]:
    dtype_name = array.dtype.name
    if dtype_name not in _NUMPY_DTYPE:
        raise WireError(f"numpy dtype {array.dtype} cannot be sent; use one of {_dtype_names()}")
    # astype, not ascontiguousarray: the latter turns a 0-d array into a 1-d one.
    array = array.astype(_NUMPY_DTYPE[dtype_name], order="C", copy=False)
    data = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")  # type: ignore[arg-type]
    return _meta(dtype_name, array.shape, data, name), data


def _encode_torch(tensor: torch.Tensor, name: str) -> tuple[TensorMeta, memoryview]:
    import torch

    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name not in DTYPE_ITEMSIZE:
        raise WireError(f"torch dtype {tensor.dtype} cannot be sent; use one of {_dtype_names()}")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    # A conjugate or negative view shares its bits with the original: materialise the values.
    tensor = tensor.contiguous().resolve_conj().resolve_neg()
    if tensor.numel() == 0:
        data = memoryview(b"")
    else:
        flat = tensor.reshape(-1)
        if flat.stride(-1) != 1:
            # torch calls a tensor whose dims of size 1 have other strides contiguous (e.g.
            # randn(4)[::4]), and its flat view keeps that stride, which a byte view refuses.
            flat = flat.clone(memory_format=torch.contiguous_format)
        # Viewing as bytes works for every dtype, bfloat16 included, which numpy lacks.
        data = memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]
    return _meta(dtype_name, tuple(tensor.shape), data, name), data


def _meta(dtype: str, shape: Sequence[int], data: memoryview, name: str) -> TensorMeta:
    return TensorMeta(
        dtype=dtype,
        shape=tuple(int(d) for d in shape),
        nbytes=data.nbytes,
        crc32c=crc32c(data),
        name=name,
    )


def empty_buffer(nbytes: int) -> Buffer:
    """A writable buffer of ``nbytes`` for ``Assembler``, not zero-filled when large.

    ``bytearray(n)`` zero-fills: for 64 MiB that pass over fresh memory took ~50 ms, longer
    than receiving the bytes that overwrite it. ``numpy.empty`` leaves the memory as the
    allocator hands it out (reused, not faulted in again, in steady state: 64 MiB assembled
    in ~17 ms against ~62 ms). The assembler writes every byte before anyone reads one.
    """
    if nbytes <= INLINE_MAX_BYTES:
        return bytearray(nbytes)
    return np.empty(nbytes, dtype=np.uint8).data


def decode(meta: TensorMeta, buffer: Buffer, kind: OutputKind = "torch") -> ArrayLike:
    """Wraps a reassembled buffer as a tensor or array of the header's dtype and shape."""
    if kind == "numpy" and meta.dtype != "bfloat16":
        return np.frombuffer(buffer, dtype=_NUMPY_DTYPE[meta.dtype]).reshape(meta.shape)
    return _decode_torch(meta, buffer)


def _decode_torch(meta: TensorMeta, buffer: Buffer) -> torch.Tensor:
    import torch

    dtype = getattr(torch, meta.dtype)
    if meta.nbytes == 0:
        return torch.empty(meta.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(meta.shape)


def _dtype_names() -> str:
    return ", ".join(sorted(DTYPE_ITEMSIZE))

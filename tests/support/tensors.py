"""Deterministic test tensors of any dtype."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Seeded random values covering the dtype's whole range (bool: 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)


def mixed_torch_inputs() -> list[torch.Tensor]:
    """Seeded tensors of many dtypes and layouts: NaN, -0.0, subnormals, scalars, empty, views."""
    generator = torch.Generator().manual_seed(7)
    return [
        torch.randn(3, 5, generator=generator).to(torch.float16),
        torch.randn(4, generator=generator).to(torch.bfloat16),
        torch.tensor([float("nan"), -0.0, float("inf"), 1e-310], dtype=torch.float64),
        torch.randint(-128, 128, (9,), generator=generator, dtype=torch.int8),
        torch.rand(6, generator=generator) > 0.5,
        torch.randn(2, 3, generator=generator, dtype=torch.complex64),
        torch.tensor(3.25),
        torch.empty(0, 4),
        torch.arange(12.0).reshape(3, 4).t(),
    ]


def mixed_numpy_inputs() -> list[np.ndarray[Any, Any]]:
    """The numpy counterpart of ``mixed_torch_inputs``, with a strided view."""
    rng = np.random.default_rng(7)
    return [
        rng.standard_normal((3, 5)).astype(np.float16),
        np.array([np.nan, -0.0, np.inf, 1e-310]),
        rng.integers(-128, 128, 9, dtype=np.int8),
        rng.random(6) > 0.5,
        (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        np.array(3.25, dtype=np.float32),
        np.empty((0, 4), dtype=np.int64),
        np.arange(24, dtype=np.uint8).reshape(4, 6)[:, ::2],
    ]


def bits(tensor: torch.Tensor) -> bytes:
    """The raw bytes of ``tensor``, to compare bit-exact (NaN payloads, -0.0)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensors(sent: list[torch.Tensor], got: tuple[Any, ...]) -> None:
    """``got`` holds torch tensors of the same dtypes, shapes and bits as ``sent``."""
    assert len(got) == len(sent)
    for a, b in zip(sent, got, strict=True):
        assert isinstance(b, torch.Tensor)
        assert (b.dtype, b.shape) == (a.dtype, a.shape)
        assert bits(b) == bits(a)

"""Tensors in files for ``gpubroker run``: ``.npy`` (one array) and ``.safetensors`` (several).

Neither format holds code: ``.npy`` files are read with ``allow_pickle=False``. A
``.safetensors`` file's tensors are taken in the natural order of their names (``x2`` before
``x10``); outputs written to one are named after the task's output names, else ``output_0``,
``output_1``, ... so that reading the file back gives them in the same order. ``bfloat16``, which
numpy lacks, is read and written through torch.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SUFFIXES",
    "TensorFileError",
    "check_output_paths",
    "natural_key",
    "read_inputs",
    "write_outputs",
]

SUFFIXES = (".npy", ".safetensors")
"""The file kinds ``run`` reads and writes."""


class TensorFileError(ValueError):
    """A tensor file that cannot be read or written as asked; the message names it."""


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sorts names with their digit runs as numbers: ``x2`` before ``x10``."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part
    )


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TensorFileError(f"{path}: not a .npy or .safetensors file")
    return suffix


def _safetensors_dtypes(path: Path) -> set[str]:
    """The dtypes a ``.safetensors`` file's header declares."""
    with path.open("rb") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def _read_one(path: Path) -> list[Any]:
    if _suffix(path) == ".npy":
        return [np.load(path, allow_pickle=False)]
    if "BF16" in _safetensors_dtypes(path):
        from safetensors.torch import load_file as load_torch

        tensors: dict[str, Any] = load_torch(path)
    else:
        from safetensors.numpy import load_file as load_numpy

        tensors = load_numpy(path)
    return [tensors[name] for name in sorted(tensors, key=natural_key)]


def read_inputs(paths: Sequence[Path]) -> list[Any]:
    """The tensors of ``paths`` in order: each ``.npy`` file one, each ``.safetensors`` file
    all of its own.

    Raises:
        TensorFileError: a file of another kind, or one that does not parse.
    """
    found: list[Any] = []
    for path in paths:
        try:
            found += _read_one(path)
        except TensorFileError:
            raise
        except (OSError, ValueError, struct.error, KeyError, TypeError) as exc:
            raise TensorFileError(f"{path}: {exc}") from exc
        except Exception as exc:  # safetensors' own errors derive from Exception only
            raise TensorFileError(f"{path}: {type(exc).__name__}: {exc}") from exc
    return found


def check_output_paths(paths: Sequence[Path]) -> None:
    """Refuses, before anything runs, output paths ``write_outputs`` could not take.

    Raises:
        TensorFileError: a path of another kind, or a ``.safetensors`` file with others.
    """
    kinds = [_suffix(path) for path in paths]
    if ".safetensors" in kinds and len(paths) > 1:
        raise TensorFileError("-o: a .safetensors file takes every output: give it alone")


def _output_names(names: Sequence[str], count: int) -> list[str]:
    given = [n for n in names[:count] if n]
    if len(given) == count and len(set(given)) == count:
        return list(given)
    return [f"output_{i}" for i in range(count)]


def write_outputs(outputs: Sequence[Any], names: Sequence[str], paths: Sequence[Path]) -> None:
    """Writes ``outputs`` (numpy arrays or torch tensors): one per ``.npy`` path, in order,
    or all into one ``.safetensors`` file under ``names`` (the task's output names).

    Raises:
        TensorFileError: the outputs do not match the paths, or a file cannot be written.
    """
    check_output_paths(paths)
    try:
        if _suffix(paths[0]) == ".safetensors":
            _save_safetensors(
                paths[0], dict(zip(_output_names(names, len(outputs)), outputs, strict=True))
            )
            return
        if len(paths) != len(outputs):
            raise TensorFileError(
                f"the task has {len(outputs)} outputs and -o names {len(paths)} .npy files; "
                "give one per output, or one .safetensors file"
            )
        for path, value in zip(paths, outputs, strict=True):
            np.save(path, _as_numpy(value), allow_pickle=False)
    except OSError as exc:
        raise TensorFileError(str(exc)) from exc


def _as_numpy(value: Any) -> np.ndarray[Any, Any]:
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value.detach().cpu().numpy())
    except TypeError as exc:  # bfloat16: numpy has no such dtype
        raise TensorFileError(f"{exc}; write it to a .safetensors file instead") from exc


def _save_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    if all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file as save_numpy

        save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
        return
    import torch
    from safetensors.torch import save_file as save_torch

    save_torch({k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, path)

"""Tensor files of ``gpubroker run`` and its parameters, without a broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest

from gpubroker.cli.run import parse_param
from gpubroker.cli.tensorfiles import (
    TensorFileError,
    check_output_paths,
    natural_key,
    read_inputs,
    write_outputs,
)


def test_names_sort_with_their_numbers_as_numbers() -> None:
    names = ["x10", "x2", "b", "x1", "a10b", "a9b"]

    assert sorted(names, key=natural_key) == ["a9b", "a10b", "b", "x1", "x2", "x10"]


def test_npy_files_round_trip_one_output_each(tmp_path: Path) -> None:
    arrays: list[np.ndarray[Any, Any]] = [
        np.arange(6, dtype=np.int32).reshape(2, 3),
        np.float16(2.5) * np.ones(4),
    ]
    paths = [tmp_path / "p.npy", tmp_path / "q.npy"]

    write_outputs(arrays, ["", ""], paths)

    for got, want in zip(read_inputs(paths), arrays, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype


def test_outputs_keep_their_own_names_in_a_safetensors_file_when_distinct(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.safetensors"

    write_outputs([np.zeros(1), np.ones(2)], ["logits", "hidden"], [path])

    from safetensors.numpy import load_file

    assert sorted(load_file(str(path))) == ["hidden", "logits"]


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        (["o.pt"], "not a .npy or .safetensors"),
        (["a.safetensors", "b.npy"], "give it alone"),
    ],
)
def test_output_paths_it_cannot_write_are_refused_first(paths: list[str], message: str) -> None:
    with pytest.raises(TensorFileError, match=message):
        check_output_paths([Path(p) for p in paths])


def test_a_pickled_npy_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)

    with pytest.raises(TensorFileError, match=r"objects\.npy"):
        read_inputs([path])


def test_a_file_that_is_not_safetensors_is_named(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")

    with pytest.raises(TensorFileError, match=r"junk\.safetensors"):
        read_inputs([path])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dim=1", ("dim", 1)),
        ("scale=0.5", ("scale", 0.5)),
        ("keepdim=True", ("keepdim", True)),
        ("mode=fast", ("mode", "fast")),
        ("empty=", ("empty", "")),
    ],
)
def test_params_take_the_narrowest_type(text: str, expected: tuple[str, object]) -> None:
    assert parse_param(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=3"])
def test_a_param_without_key_or_equals_is_a_usage_error(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_param(text)

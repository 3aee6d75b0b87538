"""The model file container: a round trip, and a refusal, naming the numbers, for each lie."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any

import pytest

from gpubroker.protos import modelfile
from gpubroker.protos.modelfile import ModelFileError


def _safetensors(entries: dict[str, Any], data: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + data


WEIGHTS = _safetensors(
    {
        "state/w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "state/b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
        "__metadata__": {"format": "pt"},
    },
    bytes(24),
)
GRAPH = b'{"graph_module": {}}'
METADATA = {"inputs": [{"dtype": "float32", "shape": [None, 3]}], "batch_dim_varies": True}


def _file(weights: bytes = WEIGHTS, graph: bytes = GRAPH) -> bytes:
    return modelfile.pack(METADATA, graph, weights)


def test_a_packed_file_parses_back_and_its_id_is_its_sha256() -> None:
    data = _file()

    parsed = modelfile.parse(data, max_bytes=len(data), expected_id=modelfile.model_id(data))

    assert parsed.model_id == hashlib.sha256(data).hexdigest()
    assert parsed.metadata == METADATA
    assert parsed.graph == GRAPH and parsed.weights == WEIGHTS
    assert [(t.name, t.dtype, t.shape, t.begin, t.end) for t in parsed.tensors] == [
        ("state/w", "F32", (2, 2), 0, 16),
        ("state/b", "I64", (1,), 16, 24),
    ]


def test_packing_is_deterministic() -> None:
    assert _file() == _file()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GBMODEL\0" + bytes(10), "truncated model file: 18 bytes, the header alone is 32"),
        (
            b"PK\x03\x04" + _file()[4:],
            "not a model file: magic b'PK\\x03\\x04DEL\\x00', expected b'GBMODEL\\x00'",
        ),
        (_file()[:8] + struct.pack("<H", 2) + _file()[10:], "format version 2, this reads 1"),
        (_file()[:10] + struct.pack("<H", 1) + _file()[12:], "flags 0x1, expected 0"),
        (_file()[:-1], "but the file has"),
        (_file() + b"\0", "but the file has"),
    ],
    ids=["truncated-header", "magic", "version", "flags", "truncated-body", "trailing-bytes"],
)
def test_a_malformed_container_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(ModelFileError, match=re.escape(message)):
        modelfile.parse(data)


def test_a_declared_size_that_lies_is_refused_with_the_numbers() -> None:
    data = bytearray(_file())
    struct.pack_into("<Q", data, 16, len(GRAPH) + 100)  # the graph claims 100 more bytes

    with pytest.raises(ModelFileError) as caught:
        modelfile.parse(bytes(data))

    assert f"graph {len(GRAPH) + 100}" in str(caught.value)
    assert f"the file has {len(data)}" in str(caught.value)


def test_a_file_over_the_limit_is_refused() -> None:
    data = _file()

    with pytest.raises(ModelFileError, match=f"{len(data)} bytes, over the limit of 100"):
        modelfile.parse(data, max_bytes=100)


def test_an_id_that_does_not_match_is_refused() -> None:
    data = _file()

    with pytest.raises(ModelFileError, match=f"expected {'0' * 64}, the bytes hash to"):
        modelfile.parse(data, expected_id="0" * 64)


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (b"\xff\xfe{}", "graph is not UTF-8"),
        (b'{"graph_module": ', "graph is not valid JSON"),
        (b"[1, 2]", "graph is a JSON list, expected an object"),
    ],
)
def test_a_graph_that_is_not_a_json_object_is_refused(graph: bytes, message: str) -> None:
    with pytest.raises(ModelFileError, match=message):
        modelfile.parse(_file(graph=graph))


def _entry(
    dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None
) -> Any:
    return {
        "dtype": dtype,
        "shape": [2] if shape is None else shape,
        "data_offsets": offsets or [0, 8],
    }


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (b"\x01\x02", "weights section is 2 bytes"),
        (struct.pack("<Q", 1 << 40) + b"{}", "safetensors header declares 1099511627776 bytes"),
        (_safetensors({"t": _entry(dtype="OBJECT")}, bytes(8)), "dtype 'OBJECT'"),
        (_safetensors({"t": _entry(shape=[-1])}, bytes(8)), "shape \\[-1\\]"),
        (_safetensors({"t": _entry(offsets=[0, 4])}, bytes(4)), "needs 8 bytes, its offsets"),
        (_safetensors({"t": _entry(offsets=[8, 16])}, bytes(16)), "starts at 8, expected 0"),
        (
            _safetensors({"a": _entry(), "b": _entry(offsets=[4, 12])}, bytes(12)),
            "starts at 4, expected 8",  # overlapping
        ),
        (_safetensors({"t": _entry()}, bytes(12)), "cover 8 bytes, the data is 12"),
        (_safetensors({"t": _entry()}, bytes(4)), "needs|cover"),
        (_safetensors({"t": "pickle"}, bytes(0)), "entry 't' is not an object"),
        (struct.pack("<Q", 4) + b"\x80\x04K\x01", "safetensors header is not UTF-8"),
    ],
    ids=[
        "short",
        "header-length-lies",
        "dtype",
        "shape",
        "size-mismatch",
        "gap",
        "overlap",
        "trailing-data",
        "data-short",
        "entry-not-object",
        "pickle-bytes",
    ],
)
def test_a_lying_safetensors_section_is_refused(weights: bytes, message: str) -> None:
    with pytest.raises(ModelFileError, match=message):
        modelfile.parse(_file(weights=weights))

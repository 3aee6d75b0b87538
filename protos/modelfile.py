"""A user's model as a file: a checked header, the graph as JSON, the weights as safetensors.

Layout (all integers little-endian)::

    offset  size  field
         0     8  magic b"GBMODEL\\0"
         8     2  format version (1)
        10     2  flags (0; anything else is refused)
        12     4  metadata length M
        16     8  graph length G
        24     8  weights length W
        32     M  metadata: UTF-8 JSON object (input/output specs, batch_dim_varies, max_batch)
      32+M     G  graph: UTF-8 JSON, torch.export's data-only schema (no pickles)
    32+M+G     W  weights: the safetensors format (8-byte header length, JSON header, raw bytes)

The file's id is the sha256 of all of it (``model_id``), so the same model is stored once. The
broker parses uploads with this module alone (no torch, no numpy); ``parse`` trusts nothing it
reads: every length, offset, dtype and shape is checked before anything is built from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DTYPE_SIZES",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "WORKLOAD_PREFIX",
    "ModelFile",
    "ModelFileError",
    "ModelSummary",
    "TensorEntry",
    "check",
    "is_model_id",
    "model_id",
    "model_of",
    "pack",
    "parse",
    "parse_safetensors_header",
    "workload_for",
]

MAGIC = b"GBMODEL\0"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHIQQ")
HEADER_SIZE = _HEADER.size
MAX_METADATA_BYTES = 1 << 20
"""The metadata section holds a few specs; a megabyte is far more than any model needs."""
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20

DTYPE_SIZES: Mapping[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
"""The safetensors dtypes a weight may have, and their sizes in bytes."""


WORKLOAD_PREFIX = "model:"
"""A task whose workload is ``model:<model_id>`` runs the tenant's uploaded model of that id."""
_HEX = frozenset("0123456789abcdef")


def is_model_id(value: str) -> bool:
    """True for 64 lowercase hex digits, the form of a model id."""
    return len(value) == 64 and set(value) <= _HEX


def workload_for(model_id: str) -> str:
    """The workload name a task gives to run the model ``model_id``."""
    return WORKLOAD_PREFIX + model_id


def model_of(workload: str) -> str | None:
    """The model id a workload name runs, or None for an operator workload."""
    return workload.removeprefix(WORKLOAD_PREFIX) if workload.startswith(WORKLOAD_PREFIX) else None


class ModelFileError(ValueError):
    """The bytes are not a well-formed model file; the message says which number is wrong."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors section: its name, dtype, shape and byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True, slots=True)
class ModelFile:
    """A parsed model file: its id, metadata, graph JSON (bytes) and safetensors weights."""

    model_id: str
    metadata: dict[str, Any]
    graph: bytes
    weights: bytes
    tensors: tuple[TensorEntry, ...]


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """A checked model file without its weights' bytes (see ``check``)."""

    model_id: str
    metadata: dict[str, Any]
    graph: bytes
    tensors: tuple[TensorEntry, ...]


def model_id(data: bytes | memoryview | mmap.mmap) -> str:
    """The content address of a model file: the sha256 of all its bytes, as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def pack(metadata: Mapping[str, Any], graph: bytes, weights: bytes) -> bytes:
    """Write a model file; the metadata JSON is canonical (sorted keys, no spaces)."""
    meta = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"), allow_nan=False)
    meta_bytes = meta.encode()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(meta_bytes), len(graph), len(weights))
    return b"".join((header, meta_bytes, graph, weights))


def parse(
    data: bytes, *, max_bytes: int | None = None, expected_id: str | None = None
) -> ModelFile:
    """Check and split a model file, refusing with ``ModelFileError`` anything malformed.

    ``max_bytes`` caps the whole file (the tenant's model quota); ``expected_id`` is the id the
    sender claimed, compared with the sha256 of what arrived.
    """
    with memoryview(data) as view:
        summary, weights_start = _check(view, max_bytes, expected_id, None)
    return ModelFile(
        summary.model_id,
        summary.metadata,
        summary.graph,
        data[weights_start:],
        summary.tensors,
    )


def check(
    data: bytes | memoryview | mmap.mmap,
    *,
    max_bytes: int | None = None,
    expected_id: str | None = None,
    digest: str | None = None,
) -> ModelSummary:
    """``parse``'s checks on any buffer (a memory map of a large file, say), without copying
    the weights: returns what the file holds except their bytes.

    ``digest`` is the sha256 a caller already computed while the bytes arrived; the buffer is
    hashed only without one.
    """
    with memoryview(data) as view:
        summary, _ = _check(view, max_bytes, expected_id, digest)
    return summary


def _check(
    data: memoryview, max_bytes: int | None, expected_id: str | None, digest: str | None
) -> tuple[ModelSummary, int]:
    if max_bytes is not None and len(data) > max_bytes:
        raise ModelFileError(f"model file is {len(data)} bytes, over the limit of {max_bytes}")
    digest = digest or model_id(data)
    if expected_id is not None and digest != expected_id:
        raise ModelFileError(
            f"model id mismatch: expected {expected_id}, the bytes hash to {digest}"
        )
    if len(data) < HEADER_SIZE:
        raise ModelFileError(
            f"truncated model file: {len(data)} bytes, the header alone is {HEADER_SIZE}"
        )
    magic, version, flags, meta_len, graph_len, weights_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ModelFileError(f"not a model file: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"model file format version {version}, this reads {FORMAT_VERSION}")
    if flags != 0:
        raise ModelFileError(f"model file flags {flags:#x}, expected 0")
    declared = HEADER_SIZE + meta_len + graph_len + weights_len
    if declared != len(data):
        raise ModelFileError(
            f"model file sections declare {declared} bytes (header {HEADER_SIZE} + metadata "
            f"{meta_len} + graph {graph_len} + weights {weights_len}) but the file has {len(data)}"
        )
    if meta_len > MAX_METADATA_BYTES:
        raise ModelFileError(
            f"metadata is {meta_len} bytes, over the limit of {MAX_METADATA_BYTES}"
        )
    graph_start = HEADER_SIZE + meta_len
    weights_start = graph_start + graph_len
    # Copies, not views, go where an error may be raised: a traceback that kept a view alive
    # would keep a caller's memory map from closing.
    metadata = _json_object(bytes(data[HEADER_SIZE:graph_start]), "metadata")
    graph = bytes(data[graph_start:weights_start])
    _json_object(graph, "graph")
    with data[weights_start:] as weights:
        tensors = parse_safetensors_header(weights)
    return ModelSummary(digest, metadata, graph, tensors), weights_start


def _json_object(raw: bytes | memoryview, section: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(raw).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{section} is not UTF-8 (byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelFileError(f"{section} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{section} is a JSON {type(value).__name__}, expected an object")
    return value


def parse_safetensors_header(weights: bytes | memoryview) -> tuple[TensorEntry, ...]:
    """Check a safetensors section: header in bounds, tensors contiguous, sizes that add up."""
    if len(weights) < 8:
        raise ModelFileError(
            f"weights section is {len(weights)} bytes, shorter than its 8-byte header length"
        )
    (header_len,) = struct.unpack_from("<Q", weights)
    if header_len > min(len(weights) - 8, MAX_SAFETENSORS_HEADER_BYTES):
        raise ModelFileError(
            f"safetensors header declares {header_len} bytes; the section has {len(weights) - 8} "
            f"after the length (limit {MAX_SAFETENSORS_HEADER_BYTES})"
        )
    header = _json_object(bytes(weights[8 : 8 + header_len]), "safetensors header")
    header.pop("__metadata__", None)
    entries = sorted(
        (_tensor_entry(name, spec) for name, spec in header.items()), key=lambda t: t.begin
    )
    position = 0
    for entry in entries:
        if entry.begin != position:
            raise ModelFileError(
                f"safetensors tensor {entry.name!r} starts at {entry.begin}, expected {position} "
                "(tensors must be contiguous and must not overlap)"
            )
        position = entry.end
    data_len = len(weights) - 8 - header_len
    if position != data_len:
        raise ModelFileError(f"safetensors tensors cover {position} bytes, the data is {data_len}")
    return tuple(entries)


def _tensor_entry(name: str, spec: object) -> TensorEntry:
    if not isinstance(spec, dict):
        raise ModelFileError(f"safetensors entry {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise ModelFileError(
            f"safetensors tensor {name!r} has dtype {dtype!r}, not one of {sorted(DTYPE_SIZES)}"
        )
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise ModelFileError(f"safetensors tensor {name!r} has shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
        raise ModelFileError(f"safetensors tensor {name!r} has data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise ModelFileError(
            f"safetensors tensor {name!r} ({dtype} {shape}) needs {nbytes} bytes, "
            f"its offsets [{begin}, {end}] hold {end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

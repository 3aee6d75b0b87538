"""Model files for the broker's tests, built by hand: no torch, the shape of a real export.

The broker checks containers and graph JSON only (``protos.modelfile``, ``protos.modelcheck``),
so a graph of a few nodes in torch.export's schema is all a test needs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

from gpubroker.protos import modelfile

LINEAR = "torch.ops.aten.linear.default"


def graph(targets: Sequence[str] = (LINEAR,), **extra: Any) -> bytes:
    """An exported program's JSON whose nodes call ``targets``."""
    nodes = [
        {"name": f"n{i}", "target": t, "inputs": [], "outputs": []} for i, t in enumerate(targets)
    ]
    document = {"graph_module": {"graph": {"nodes": nodes, **extra}, "signature": {}}}
    return json.dumps(document, sort_keys=True).encode()


def weights(floats: int = 4) -> bytes:
    """A safetensors section of one float32 tensor."""
    header = json.dumps(
        {"state/w": {"dtype": "F32", "shape": [floats], "data_offsets": [0, 4 * floats]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * floats)


def metadata(
    inputs: Sequence[tuple[str, list[int | None]]] = (("float32", [None, 8]),),
    *,
    varies: bool = True,
    max_batch: int | None = 64,
) -> dict[str, Any]:
    """Model metadata as ``client.export`` writes it."""
    return {
        "inputs": [{"dtype": d, "shape": s} for d, s in inputs],
        "outputs": [{"dtype": "float32", "shape": [None, 4] if varies else [2, 4]}],
        "batch_dim_varies": varies,
        "max_batch": max_batch if varies else None,
    }


def model_bytes(
    *,
    meta: dict[str, Any] | None = None,
    graph_json: bytes | None = None,
    weights_section: bytes | None = None,
    salt: int = 0,
) -> bytes:
    """A well-formed model file (``salt`` changes its bytes, hence its id)."""
    return modelfile.pack(
        meta if meta is not None else metadata(),
        graph_json if graph_json is not None else graph(),
        weights_section if weights_section is not None else weights(4 + salt),
    )

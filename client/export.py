"""Export a user's ``nn.Module`` into a model file (``gpubroker.protos.modelfile``), on the client.

``torch.export.export`` captures the module's forward as a graph of ATen operators. Its graph is
written with torch's own data-only serializer (``GraphModuleSerializer`` through
``ExportedProgramSerializer.serialize(..., serialize_state_dict=False, serialize_constants=False,
serialize_example_inputs=False)``, so no ``torch.save`` pickle is made), and the weights, buffers
and tensor constants as safetensors. Node metadata (stack traces with local file paths) is
dropped and the JSON written with sorted keys, so the same module gives the same bytes and id.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import safetensors.torch
import torch
from torch._export.serde import serialize as serde

from gpubroker.client._models import EXPORT_MAX_BATCH
from gpubroker.client.errors import ModelExportError
from gpubroker.protos import modelfile

__all__ = ["CONSTANT_PREFIX", "STATE_PREFIX", "ModelExportError", "export_model"]

STATE_PREFIX = "state/"
"""Safetensors names of parameters and persistent buffers: this prefix + the state-dict key."""
CONSTANT_PREFIX = "constant/"
"""Safetensors names of tensor constants and non-persistent buffers."""
DEFAULT_MAX_BATCH = EXPORT_MAX_BATCH
"""The bound of a varying batch dimension unless ``max_batch`` says otherwise."""


def export_model(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    batch_dim_varies: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> bytes:
    """Export ``module`` called on ``example_inputs`` into the bytes of a model file.

    With ``batch_dim_varies`` the first dimension of every input may be any size from 1 to
    ``max_batch`` (the example's batch must be at least 2, or export fixes it to 1).
    """
    inputs = tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ModelExportError("example_inputs must be a sequence of tensors")
    dynamic_shapes: tuple[dict[int, Any], ...] | None = None
    if batch_dim_varies:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    try:
        program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
        outputs = program.module()(*inputs)
    except Exception as e:  # export raises many types; the message is what the user needs
        raise ModelExportError(f"torch.export could not capture the module: {e}") from e
    flat_outputs, _ = torch.utils._pytree.tree_flatten(outputs)
    if not all(isinstance(t, torch.Tensor) for t in flat_outputs):
        raise ModelExportError("the module must return tensors (or tuples/lists of tensors)")
    metadata = {
        "inputs": [_spec(t, batch_dim_varies) for t in inputs],
        "outputs": [_spec(t, batch_dim_varies) for t in flat_outputs],
        "batch_dim_varies": batch_dim_varies,
        "max_batch": max_batch if batch_dim_varies else None,
    }
    return modelfile.pack(metadata, graph_json(program), weights_safetensors(program))


def _spec(t: torch.Tensor, batch_dim_varies: bool) -> dict[str, Any]:
    shape: list[int | None] = list(t.shape)
    if batch_dim_varies and shape:
        shape[0] = None
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": shape}


def graph_json(program: torch.export.ExportedProgram) -> bytes:
    """The program's graph in torch's JSON schema, without pickles or node metadata."""
    serialized = serde.ExportedProgramSerializer().serialize(
        program,
        serialize_state_dict=False,
        serialize_constants=False,
        serialize_example_inputs=False,
    )
    graph_module = serialized.exported_program.graph_module
    if graph_module.signature.input_specs and any(
        spec.type == "custom_obj" for spec in graph_module.signature.input_specs
    ):
        raise ModelExportError("the module holds script objects, which a model file cannot carry")
    nodes = [dataclasses.replace(node, metadata={}) for node in graph_module.graph.nodes]
    graph = dataclasses.replace(graph_module.graph, nodes=nodes)
    program_schema = dataclasses.replace(
        serialized.exported_program,
        graph_module=dataclasses.replace(graph_module, graph=graph),
    )
    as_dict = serde._dataclass_to_dict(program_schema)  # type: ignore[no-untyped-call]
    text = json.dumps(
        as_dict, cls=serde.EnumEncoder, sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    return text.encode()


def weights_safetensors(program: torch.export.ExportedProgram) -> bytes:
    """The program's state dict and tensor constants, as one safetensors blob."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, values in (
        (STATE_PREFIX, program.state_dict),
        (CONSTANT_PREFIX, program.constants),
    ):
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise ModelExportError(
                    f"{name!r} is a {type(value).__name__}, not a tensor; "
                    "a model file holds tensors only"
                )
            # A copy of each: safetensors refuses tensors that share memory (tied weights).
            tensors[prefix + name] = value.detach().to("cpu").contiguous().clone()
    return safetensors.torch.save(tensors)

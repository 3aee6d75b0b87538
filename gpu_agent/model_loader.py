"""Rebuild a user's model from a model file, after checking it, without ever unpickling.

The steps, each refusing with ``ModelRejectedError`` (which names the cause):

1. ``gpubroker.protos.modelfile.parse`` checks the id, the lengths and the safetensors header.
2. The graph JSON is checked by ``gpubroker.protos.modelcheck`` (the policy the broker also
   applies at upload: depth, symbolic expressions, no script objects, subgraphs or operators
   passed as arguments), then every node's target by ``operators.check_target``, which adds
   what needs torch. Node and graph metadata are dropped unread.
3. The weights are read by ``safetensors.torch.load`` (a Rust parser of plain tensor bytes).
4. torch's ``ExportedProgramDeserializer().deserialize`` rebuilds the program from the schema
   dataclasses, given the state dict and constants as dicts: ``GraphModuleDeserializer.
   deserialize`` passes dicts through ``deserialize_torch_artifact`` untouched (its
   ``isinstance(serialized, (dict, tuple))`` branch), so neither of that function's ``torch.load``
   calls runs, and with ``example_inputs=None`` it is not called for them at all.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import safetensors.torch
import torch
from torch._export.serde import schema
from torch._export.serde import serialize as serde

from gpubroker.client.export import CONSTANT_PREFIX, STATE_PREFIX
from gpubroker.gpu_agent.operators import OperatorRefusedError, check_target
from gpubroker.protos import modelcheck, modelfile

__all__ = ["LoadedModel", "ModelRejectedError", "load_model"]


class ModelRejectedError(ValueError):
    """A model file is malformed or calls what the agent does not run; nothing of it ran."""


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    """A checked, rebuilt model: call it with input tensors to get a tuple of output tensors."""

    model_id: str
    metadata: dict[str, Any]
    program: torch.export.ExportedProgram
    _forward: Callable[..., Any]

    @property
    def module(self) -> torch.nn.Module:
        """The rebuilt graph module (an ``fx.GraphModule``), for finding a failing node."""
        module: torch.nn.Module = self._forward  # type: ignore[assignment]
        return module

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            outputs = self._forward(*inputs)
        flat, _ = torch.utils._pytree.tree_flatten(outputs)
        return tuple(flat)


def load_model(
    data: bytes,
    *,
    expected_id: str | None = None,
    max_bytes: int | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Check and rebuild the model in ``data`` on ``device``, or raise ``ModelRejectedError``."""
    try:
        parsed = modelfile.parse(data, max_bytes=max_bytes, expected_id=expected_id)
        program_schema = _checked_program(parsed.graph)
    except (modelfile.ModelFileError, OperatorRefusedError) as e:
        raise ModelRejectedError(str(e)) from None
    parameters = {
        spec.parameter.parameter_name
        for spec in program_schema.graph_module.signature.input_specs
        if spec.type == "parameter"
    }
    state_dict, constants = _tensors(parsed.weights, torch.device(device), parameters)
    try:
        program = serde.ExportedProgramDeserializer().deserialize(
            program_schema, state_dict, constants, None
        )
        forward = program.module()
    except Exception as e:  # torch raises many types on a graph it cannot rebuild
        raise ModelRejectedError(f"the graph could not be rebuilt: {e}") from None
    return LoadedModel(parsed.model_id, parsed.metadata, program, forward)


def _checked_program(graph: bytes) -> schema.ExportedProgram:
    document = json.loads(graph)
    modelcheck.check_document(document)
    try:
        program = serde._dict_to_dataclass(schema.ExportedProgram, document)  # type: ignore[no-untyped-call]
    except Exception as e:
        raise OperatorRefusedError(f"the graph does not fit torch's export schema: {e}") from None
    if not isinstance(program, schema.ExportedProgram):
        raise OperatorRefusedError("the graph is not an exported program")
    graph_module = program.graph_module
    nodes = [dataclasses.replace(node, metadata={}) for node in graph_module.graph.nodes]
    for node in nodes:
        check_target(node.target)
    return dataclasses.replace(
        program,
        graph_module=dataclasses.replace(
            graph_module,
            graph=dataclasses.replace(graph_module.graph, nodes=nodes),
            metadata={},
        ),
    )


def _tensors(
    weights: bytes, device: torch.device, parameters: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state_dict: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    for name, tensor in safetensors.torch.load(weights).items():
        if name.startswith(STATE_PREFIX):
            key = name.removeprefix(STATE_PREFIX)
            value = tensor.to(device)
            is_parameter = key in parameters
            state_dict[key] = (
                torch.nn.Parameter(value, requires_grad=False) if is_parameter else value
            )
        elif name.startswith(CONSTANT_PREFIX):
            constants[name.removeprefix(CONSTANT_PREFIX)] = tensor.to(device)
        else:
            raise ModelRejectedError(f"weight {name!r} is neither state nor a constant")
    return state_dict, constants

"""Exporting a module into a model file on the client: data only, deterministic, early errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gpubroker.client.export import ModelExportError, export_model
from gpubroker.protos import modelfile


class _Branchy(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_an_export_is_a_model_file_with_the_weights_as_safetensors() -> None:
    module = _mlp()

    parsed = modelfile.parse(export_model(module, (torch.randn(4, 8),)))

    assert {t.name: t.shape for t in parsed.tensors} == {
        "state/0.weight": (16, 8),
        "state/0.bias": (16,),
        "state/2.weight": (4, 16),
        "state/2.bias": (4,),
    }
    assert parsed.metadata == {
        "inputs": [{"dtype": "float32", "shape": [4, 8]}],
        "outputs": [{"dtype": "float32", "shape": [4, 4]}],
        "batch_dim_varies": False,
        "max_batch": None,
    }
    graph = json.loads(parsed.graph)
    targets = {node["target"] for node in graph["graph_module"]["graph"]["nodes"]}
    assert targets == {"torch.ops.aten.linear.default", "torch.ops.aten.relu.default"}
    assert all(node["metadata"] == {} for node in graph["graph_module"]["graph"]["nodes"])


def test_a_varying_batch_dimension_is_recorded() -> None:
    parsed = modelfile.parse(
        export_model(_mlp(), (torch.randn(4, 8),), batch_dim_varies=True, max_batch=64)
    )

    assert parsed.metadata["inputs"] == [{"dtype": "float32", "shape": [None, 8]}]
    assert parsed.metadata["batch_dim_varies"] is True and parsed.metadata["max_batch"] == 64


def test_the_same_module_exported_twice_has_the_same_id() -> None:
    example = (torch.randn(4, 8),)

    first = export_model(_mlp(), example, batch_dim_varies=True)
    second = export_model(_mlp(), example, batch_dim_varies=True)

    assert first == second
    assert modelfile.model_id(first) == modelfile.model_id(second)


def test_other_weights_give_another_id() -> None:
    module = _mlp()
    example = (torch.randn(4, 8),)
    before = export_model(module, example)
    with torch.no_grad():
        next(module.parameters()).add_(1)

    assert modelfile.model_id(export_model(module, example)) != modelfile.model_id(before)


def test_a_module_export_cannot_capture_raises_with_exports_explanation() -> None:
    with pytest.raises(ModelExportError, match=r"torch\.export could not capture") as caught:
        export_model(_Branchy(), (torch.randn(3),))

    assert "data-dependent" in str(caught.value).lower() or "guard" in str(caught.value).lower()
    assert isinstance(caught.value.__cause__, Exception)


def test_inputs_must_be_tensors() -> None:
    with pytest.raises(ModelExportError, match="sequence of tensors"):
        export_model(_mlp(), ([1.0] * 8,))  # type: ignore[arg-type]

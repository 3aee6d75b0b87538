"""Real users' models for the agent's model tests, exported once per test session."""

from __future__ import annotations

import functools

import torch
from torch import nn

from gpubroker.client.export import export_model
from gpubroker.protos import modelfile

FEATURES: dict[str, tuple[int, ...]] = {"mlp": (8,), "cnn": (3, 8, 8), "transformer": (5, 16)}
"""Each model's input shape without its batch dimension."""


def module(name: str) -> nn.Module:
    """A freshly seeded module: an MLP, a small CNN, a transformer layer, or an embedding."""
    torch.manual_seed(sum(map(ord, name)))
    if name == "mlp":
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5)
        ).eval()
    if name == "transformer":
        return nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    if name == "embedding":
        return nn.Sequential(nn.Embedding(10, 4))
    raise KeyError(name)


@functools.cache
def model_file(name: str, batch_dim_varies: bool = True) -> bytes:
    """The exported model file of ``module(name)`` (an embedding takes int64 token ids)."""
    example = (
        torch.tensor([[1, 2], [3, 4]]) if name == "embedding" else torch.randn(4, *FEATURES[name])
    )
    return export_model(module(name), (example,), batch_dim_varies=batch_dim_varies)


def model_id(name: str, batch_dim_varies: bool = True) -> str:
    """The id of ``model_file(name)``."""
    return modelfile.model_id(model_file(name, batch_dim_varies))

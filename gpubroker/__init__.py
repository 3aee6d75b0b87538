"""gpubroker: run PyTorch work on cheap remote GPUs through a broker, billed for GPU time only.

The one import namespace of the project. Its packages live in the repository's top-level folders
and are mapped here by pyproject.toml (this folder's links to them serve tools that read the
source tree, such as mypy and import-linter)::

    gpubroker.protos     the wire layer: generated messages, tensor framing, ids, states, transport
    gpubroker.client     the SDK for user code: Client, AsyncClient, the torch/numpy codec
    gpubroker.broker     the broker process (``python -m gpubroker.broker``)
    gpubroker.gpu_agent  the agent process on a GPU machine (``python -m gpubroker.gpu_agent``)
    gpubroker.billing    the usage ledger, prices, reports (``python -m gpubroker.billing``)

``from gpubroker import Client, AsyncClient`` (or any other name of ``gpubroker.client``) is the
SDK's front door. The names are loaded on first use, so that ``import gpubroker.broker`` never
loads the SDK, numpy or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpubroker.client import (
        AlreadyExistsError,
        AsyncClient,
        AsyncTaskHandle,
        Attempt,
        AuthenticationError,
        Client,
        DeadlineExceededError,
        FailedPreconditionError,
        GpuBrokerError,
        GpuRequirement,
        InternalError,
        InvalidArgumentError,
        Model,
        ModelExportError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        TaskCancelledError,
        TaskFailedError,
        TaskHandle,
        TaskResult,
        TaskState,
        TaskStatus,
        TensorMeta,
        TensorSpec,
        UnavailableError,
        Usage,
        client_credentials,
    )

# The SDK's public names, the same list as gpubroker.client.__all__ (a test keeps them equal).
__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncTaskHandle",
    "Attempt",
    "AuthenticationError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GpuBrokerError",
    "GpuRequirement",
    "InternalError",
    "InvalidArgumentError",
    "Model",
    "ModelExportError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskHandle",
    "TaskResult",
    "TaskState",
    "TaskStatus",
    "TensorMeta",
    "TensorSpec",
    "UnavailableError",
    "Usage",
    "client_credentials",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("gpubroker.client"), name)
    raise AttributeError(f"module 'gpubroker' has no attribute {name!r}")

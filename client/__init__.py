"""Python SDK of the GPU broker: send PyTorch tensors or numpy arrays, get results back.

Example::

    import torch
    from gpubroker import Client

    with Client("localhost:50051", api_key="...") as client:
        product = client.run("matmul", [torch.randn(64, 32), torch.randn(32, 8)]).output
        spectrum = client.submit("fft", torch.randn(1024)).result(timeout=60).output
        sums = [r.output for r in client.map("add", [[torch.ones(3), torch.ones(3)]] * 100)]

        # Your own nn.Module: exported here (data only, no pickles), uploaded once, run there.
        model = client.upload_model(net, [torch.randn(8, 3, 224, 224)], batch_dim_varies=True)
        logits = client.run(model, torch.randn(1, 3, 224, 224), gpu="nvidia-l4").output

``AsyncClient`` offers the same methods as coroutines. Every failed call raises a subclass of
``GpuBrokerError`` named after its gRPC status (see ``gpubroker.client.errors``).
"""

from __future__ import annotations

from gpubroker.client._async import AsyncClient
from gpubroker.client._handle import AsyncTaskHandle, TaskHandle
from gpubroker.client._sync import Client
from gpubroker.client._types import (
    Attempt,
    GpuRequirement,
    Model,
    TaskResult,
    TaskStatus,
    TensorSpec,
    Usage,
)
from gpubroker.client.errors import (
    AlreadyExistsError,
    AuthenticationError,
    DeadlineExceededError,
    FailedPreconditionError,
    GpuBrokerError,
    InternalError,
    InvalidArgumentError,
    ModelExportError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TaskCancelledError,
    TaskFailedError,
    UnavailableError,
)
from gpubroker.protos.states import TaskState
from gpubroker.protos.transport import client_credentials
from gpubroker.protos.wire import TensorMeta

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

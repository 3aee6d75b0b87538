"""Python SDK of the GPU broker: send PyTorch tensors or numpy arrays, get results back.

Example::

    import torch
    from gpubroker import Client

    with Client("localhost:50051", api_key="...") as client:
        product = client.run("matmul", [torch.randn(64, 32), torch.randn(32, 8)]).output
        spectrum = client.submit("fft", torch.randn(1024)).result(timeout=60).output
        sums = [r.output for r in client.map("add", [[torch.ones(3), torch.ones(3)]] * 100)]

``AsyncClient`` offers the same methods as coroutines. Every failed call raises a subclass of
``GpuBrokerError`` named after its gRPC status (see ``gpubroker.client.errors``).
"""

from __future__ import annotations

from gpubroker.client._async import AsyncClient, AsyncTaskHandle
from gpubroker.client._sync import Client, TaskHandle
from gpubroker.client._types import TaskResult, TaskStatus, Usage
from gpubroker.client.errors import (
    AlreadyExistsError,
    AuthenticationError,
    DeadlineExceededError,
    FailedPreconditionError,
    GpuBrokerError,
    InternalError,
    InvalidArgumentError,
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
    "AuthenticationError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GpuBrokerError",
    "InternalError",
    "InvalidArgumentError",
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
    "UnavailableError",
    "Usage",
    "client_credentials",
]

"""What the hostile test sends: tensors, valid jobs, cases and what each must be answered."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from gpubroker.broker.config import Limits
from gpubroker.gpu_agent.workloads import registry
from gpubroker.protos import broker_pb2, task_pb2
from gpubroker.protos.wire import DTYPE_ITEMSIZE, crc32c

if TYPE_CHECKING:
    from tests.e2e.hostile.harness import Harness

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
TENANT_KEYS = tuple(KEYS)
LIMITS = Limits(
    max_tensor_bytes=1 << 20,
    max_task_bytes=3 << 19,
    max_inputs=4,
    max_params=4,
    max_rank=6,
    max_dim=1 << 24,
    allowed_dtypes=frozenset(DTYPE_ITEMSIZE) - {"complex128"},
    max_timeout_s=3600.0,
)
DTYPES = sorted(LIMITS.allowed_dtypes)
KNOWN_WORKLOADS = frozenset(registry())
INT64_MAX = (1 << 63) - 1
INT32_MAX = (1 << 31) - 1

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS

Part = broker_pb2.TaskHeader | bytes | None
"""One message of a Submit or Run stream: a header, a chunk's bytes, or a message with neither."""


# -- what is sent -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """A tensor's raw bytes and what its header says about them."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def header(self, **overrides: Any) -> task_pb2.TensorHeader:
        fields: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        fields |= {"nbytes": len(self.data)}
        return task_pb2.TensorHeader(**(fields | {"crc32c": crc32c(self.data)} | overrides))


@dataclass(frozen=True)
class Job:
    """A valid echo task: inputs, scheduling fields and where its byte stream is cut."""

    inputs: tuple[Tensor, ...]
    priority: int
    timeout_s: float
    cuts: tuple[int, ...]

    @property
    def data(self) -> bytes:
        return b"".join(t.data for t in self.inputs)

    def header(
        self, inputs: Sequence[task_pb2.TensorHeader] | None = None, **fields: Any
    ) -> broker_pb2.TaskHeader:
        values: dict[str, Any] = {"workload": "echo", "priority": self.priority}
        values["timeout_seconds"] = self.timeout_s
        headers = [t.header() for t in self.inputs] if inputs is None else inputs
        return broker_pb2.TaskHeader(inputs=headers, **(values | fields))

    def chunks(self, data: bytes | None = None) -> list[bytes]:
        data = self.data if data is None else data
        edges = [0, *(min(c, len(data)) for c in self.cuts), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(edges)]

    def parts(self, **fields: Any) -> list[Part]:
        return [self.header(**fields), *self.chunks()]


Send = Callable[["Harness"], Awaitable[None]]
"""Sends one case through a harness."""


@dataclass(frozen=True)
class Case:
    """One generated request and the status code it must end with."""

    family: str
    expected: grpc.StatusCode
    send: Send = field(repr=False)
    hostile: bool = True


def inline_task(index: int, header: broker_pb2.TaskHeader, data: bytes) -> broker_pb2.InlineTask:
    """One task of a ``RunMany`` batch."""
    return broker_pb2.InlineTask(index=index, header=header, data=data)


DETAILS = {
    "wrong nbytes": "nbytes is",
    "negative dimension": "negative dimension",
    "rank beyond the wire format": "exceeds the maximum of 32",
    "rank over max_rank": "(max_rank)",
    "dimension over max_dim": "(max_dim)",
    "huge declared shape": "(max_tensor_bytes)",
    "task over max_task_bytes": "(max_task_bytes)",
    "too many inputs": "inputs exceed the limit",
    "unknown dtype": "unknown dtype",
    "dtype not allowed": "is not accepted",
    "bad crc32c": "crc32c",
    "flipped bit": "crc32c",
    "truncated stream": "stream ended after",
    "extra bytes": "more bytes than",
    "chunk first": "must start with a header",
    "empty message": "header",
    "empty stream": "must start with a header",
    "two headers": "only chunk messages",
    "unknown workload": "workload",
    "too many params": "params exceed the limit",
    "param without a value": "has no value",
    "priority out of range": "priority",
    "bad timeout": "(max_timeout_s)",
    "bad API key": "api key",
    "other tenant's task id": "not found",
    "random task id": "not found",
    "oversize message": "larger than max",
    "request_id reused for other work": "already used",
    "params the workload refuses": "unknown parameter",
}
"""A few words each family's refusal must say (case-insensitive)."""

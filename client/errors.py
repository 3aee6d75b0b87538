"""Errors the client raises, one class per gRPC status code, mapped in exactly one place.

GpuBrokerError                    (any failed call; .code, .details)
├── InvalidArgumentError          INVALID_ARGUMENT (also a refused model)
├── NotFoundError                 NOT_FOUND (also another tenant's task or model)
├── AlreadyExistsError            ALREADY_EXISTS (request_id reused for other work)
├── AuthenticationError           UNAUTHENTICATED
├── PermissionDeniedError         PERMISSION_DENIED
├── ResourceExhaustedError        RESOURCE_EXHAUSTED (size limits, quotas, budgets)
├── FailedPreconditionError       FAILED_PRECONDITION (e.g. no GPU meets the requirement)
├── UnavailableError              UNAVAILABLE, or the connection lost mid-call (retryable)
├── DeadlineExceededError         DEADLINE_EXCEEDED (also a TimeoutError)
├── TaskCancelledError            CANCELLED
├── TaskFailedError               ABORTED (the workload raised, or a poison task)
└── InternalError                 INTERNAL, UNKNOWN and the rest

ModelExportError (a ValueError)   upload_model: torch.export could not capture the module;
                                  raised on the client, before anything is sent

A task that failed on an agent carries the agent's message in ``details``, e.g.
``"RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 8x16)"`` followed by lines
naming the failing graph node or the last frames of the traceback; ``remote_type`` is the
exception type it names (``"RuntimeError"``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import grpc

from gpubroker.protos.states import FailureCode

__all__ = [
    "AlreadyExistsError",
    "AuthenticationError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GpuBrokerError",
    "InternalError",
    "InvalidArgumentError",
    "ModelExportError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TaskCancelledError",
    "TaskFailedError",
    "UnavailableError",
    "error_from_code",
    "error_from_rpc",
    "translate_rpc_errors",
]


# "<ExceptionType>: <message>", the type maybe dotted (torch.OutOfMemoryError). Its last part
# must be CamelCase with a lower-case letter, so that a broker's "refused: ..." or a status name
# such as "INVALID_ARGUMENT: ..." is not taken for an exception type.
_REMOTE_TYPE = re.compile(r"((?:[A-Za-z_]\w*\.)*[A-Z]\w*[a-z]\w*): ")

# gRPC's own words, whole, for a call whose connection went away (e.g. the broker restarted):
# it reports them as UNKNOWN or INTERNAL, though nothing is wrong but the connection.
_CONNECTION_LOST = re.compile(
    r"Stream removed|Socket closed|Connection reset by peer|Broken pipe|GOAWAY received"
    r"|Received RST_STREAM with error code \d+|Failed to connect to remote host.*"
)


class GpuBrokerError(Exception):
    """A call to the broker failed; ``code`` is the gRPC status, ``details`` its message.

    ``str(error)`` is ``"<STATUS>: <details>"`` with the whole of ``details``, so a remote
    traceback's lines are all there when the error is printed.
    """

    code: grpc.StatusCode
    """The call's gRPC status code."""
    details: str
    """The broker's explanation, e.g. the workload's own error message, in full."""
    remote_type: str | None
    """The name of the exception the workload raised on the agent (e.g. ``"RuntimeError"``,
    ``"torch.OutOfMemoryError"``) when ``details`` starts with one; None otherwise."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        match = _REMOTE_TYPE.match(details)
        self.remote_type = match.group(1) if match else None

    def __reduce__(self) -> tuple[type[GpuBrokerError], tuple[grpc.StatusCode, str]]:
        # Exception pickles its str() args by default, which this __init__ does not take.
        return type(self), (self.code, self.details)


class InvalidArgumentError(GpuBrokerError):
    """The request, its tensors or its parameters are malformed, or the broker refused a model
    (malformed file, or an operator it does not allow)."""


class NotFoundError(GpuBrokerError):
    """No such task or model (or it belongs to another tenant)."""


class AlreadyExistsError(GpuBrokerError):
    """A request_id was reused for different work."""


class AuthenticationError(GpuBrokerError):
    """The API key is missing or wrong."""


class PermissionDeniedError(GpuBrokerError):
    """The key may not do this."""


class ResourceExhaustedError(GpuBrokerError):
    """A size limit, quota (the model quota too) or budget was hit."""


class FailedPreconditionError(GpuBrokerError):
    """Not possible as things stand: no GPU the broker can start or reach meets the task's
    ``gpu``/``min_gpu_memory``, a model still has queued or running tasks, or the task is
    not in a state that allows this."""


class UnavailableError(GpuBrokerError):
    """The broker cannot be reached right now, or the connection was lost during the call
    (``code`` then is gRPC's, often UNKNOWN with ``"Stream removed"``); retrying may help."""


class DeadlineExceededError(GpuBrokerError, TimeoutError):
    """The call or the task ran out of time."""


class TaskCancelledError(GpuBrokerError):
    """The task was cancelled."""


class TaskFailedError(GpuBrokerError):
    """The task failed on the agents (ABORTED); the message says how:

    - ``"<ExceptionType>: <message>"`` and the failing graph node or the last frames: the
      workload or model raised (``remote_type`` is the exception's name);
    - ``"poison task: its agent was lost N times ..."``: every agent that took the task died,
      disconnected or went silent, so the broker stopped retrying it;
    - ``"gave up after N attempts whose results could not be used; ..."``: its results kept
      arriving corrupt.
    """


class InternalError(GpuBrokerError):
    """Something went wrong inside the broker."""


class ModelExportError(ValueError):
    """``torch.export`` could not capture the module; the message is export's own explanation.

    Raised by ``upload_model`` on the client, before anything is sent to the broker.
    """


_ERROR_FOR: dict[grpc.StatusCode, type[GpuBrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: TaskCancelledError,
    grpc.StatusCode.ABORTED: TaskFailedError,
}


def error_from_code(code: grpc.StatusCode | FailureCode | str, details: str) -> GpuBrokerError:
    """The typed error for a status code: a ``grpc.StatusCode``, a task's ``FailureCode`` or a
    status name as the wire carries it (an unknown name is UNKNOWN)."""
    if isinstance(code, FailureCode):
        code = code.value
    if isinstance(code, str):
        code = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)
    return _ERROR_FOR.get(code, InternalError)(code, details)


def error_from_rpc(exc: grpc.RpcError) -> GpuBrokerError:
    """The typed error for a failed call."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    lost = code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    if lost and _CONNECTION_LOST.fullmatch(details):
        return UnavailableError(code, details)
    return error_from_code(code, details)


@contextlib.contextmanager
def translate_rpc_errors() -> Iterator[None]:
    """Re-raises gRPC errors as typed ``GpuBrokerError``s; the only place that catches them."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None

"""The client's one mapping from gRPC status codes to typed exceptions."""

from __future__ import annotations

import pickle

import grpc
import pytest

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
    error_from_code,
    translate_rpc_errors,
)

EXPECTED: dict[grpc.StatusCode, type[GpuBrokerError]] = {
    grpc.StatusCode.CANCELLED: TaskCancelledError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: TaskFailedError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.UNIMPLEMENTED: InternalError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: InternalError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
}


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def _raised(code: grpc.StatusCode, details: str | None = "why") -> GpuBrokerError:
    with pytest.raises(GpuBrokerError) as excinfo, translate_rpc_errors():
        raise _FakeRpcError(code, details)
    return excinfo.value


def test_the_table_covers_every_status_code_but_ok() -> None:
    assert set(EXPECTED) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


@pytest.mark.parametrize(("code", "cls"), EXPECTED.items(), ids=[c.name for c in EXPECTED])
def test_each_status_code_becomes_its_own_error(
    code: grpc.StatusCode, cls: type[GpuBrokerError]
) -> None:
    error = _raised(code)

    assert type(error) is cls
    assert error.code is code
    assert error.details == "why"
    assert str(error) == f"{code.name}: why"


def test_a_deadline_is_also_a_builtin_timeout() -> None:
    assert isinstance(_raised(grpc.StatusCode.DEADLINE_EXCEEDED), TimeoutError)


def test_missing_details_become_an_empty_string() -> None:
    assert _raised(grpc.StatusCode.INTERNAL, None).details == ""


def test_a_task_error_code_name_maps_like_a_status_code() -> None:
    assert type(error_from_code("ABORTED", "boom")) is TaskFailedError
    assert error_from_code("NO_SUCH_CODE", "?").code is grpc.StatusCode.UNKNOWN


def test_other_exceptions_pass_through_untouched() -> None:
    with pytest.raises(KeyError), translate_rpc_errors():
        raise KeyError("x")


def test_an_error_survives_pickling_with_its_code_and_details() -> None:
    error = _raised(grpc.StatusCode.NOT_FOUND, "no task abc")

    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is NotFoundError
    assert (copy.code, copy.details) == (grpc.StatusCode.NOT_FOUND, "no task abc")


@pytest.mark.parametrize(
    ("details", "remote_type"),
    [
        ("ValueError: boom", "ValueError"),
        ("KeyError: 'x'", "KeyError"),
        ("torch.OutOfMemoryError: CUDA out of memory", "torch.OutOfMemoryError"),
        ("RuntimeError: shapes differ\n  at node linear_1 (aten.linear.default)", "RuntimeError"),
        ("refused: too many tasks", None),
        ("INVALID_ARGUMENT: wrapped", None),
        ("no model abc", None),
        ("Task abc: deadline passed", None),
        ("", None),
    ],
)
def test_the_remote_exception_type_is_read_from_the_start_of_the_details(
    details: str, remote_type: str | None
) -> None:
    assert error_from_code("ABORTED", details).remote_type == remote_type


def test_a_remote_error_keeps_its_type_and_every_line_through_pickling() -> None:
    details = 'RuntimeError: bad\n  File "model.py", line 3, in forward\n    return x @ w'
    error = error_from_code("ABORTED", details)

    copy = pickle.loads(pickle.dumps(error))

    assert str(copy) == f"ABORTED: {details}"
    assert copy.remote_type == "RuntimeError"

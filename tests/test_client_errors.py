"""The client's public surface and its one mapping from gRPC status codes to exceptions."""

from __future__ import annotations

import grpc
import pytest

import client
from client.errors import (
    DeadlineExceededError,
    GpuBrokerError,
    InternalError,
    NotFoundError,
    TaskCancelledError,
    TaskFailedError,
    translate_rpc_errors,
)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _raised(code: grpc.StatusCode) -> GpuBrokerError:
    with pytest.raises(GpuBrokerError) as excinfo, translate_rpc_errors():
        raise _FakeRpcError(code, "why")
    return excinfo.value


def test_the_public_names_are_sorted_and_all_exported() -> None:
    assert client.__all__ == sorted(client.__all__)
    for name in client.__all__:
        assert hasattr(client, name), name
    public = {n for n in vars(client) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(client.__all__)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, TaskCancelledError),
        (grpc.StatusCode.ABORTED, TaskFailedError),
        (grpc.StatusCode.INVALID_ARGUMENT, client.InvalidArgumentError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, client.ResourceExhaustedError),
        (grpc.StatusCode.UNAUTHENTICATED, client.AuthenticationError),
        (grpc.StatusCode.UNAVAILABLE, client.UnavailableError),
        (grpc.StatusCode.DATA_LOSS, InternalError),
    ],
)
def test_each_status_code_becomes_its_own_error(
    code: grpc.StatusCode, cls: type[GpuBrokerError]
) -> None:
    error = _raised(code)

    assert type(error) is cls
    assert error.code is code and error.details == "why"


def test_a_deadline_is_also_a_builtin_timeout() -> None:
    assert isinstance(_raised(grpc.StatusCode.DEADLINE_EXCEEDED), TimeoutError)


def test_parameters_of_unsupported_types_are_refused_before_sending() -> None:
    from client.proto import params_to_proto

    assert params_to_proto({"flag": True})["flag"].WhichOneof("kind") == "bool_value"
    assert params_to_proto({"n": 3})["n"].WhichOneof("kind") == "int_value"
    with pytest.raises(TypeError, match="use int, float, str or bool"):
        params_to_proto({"bad": [1, 2]})

"""The retry policy: which failures are retried, how long, and within the call's timeout."""

from __future__ import annotations

import pickle
import time

import grpc
import pytest

from gpubroker.client import (
    DeadlineExceededError,
    InternalError,
    TaskFailedError,
    UnavailableError,
)
from gpubroker.client._retry import MAX_BACKOFF_S, Retrier, is_transient
from gpubroker.client.errors import error_from_code, error_from_rpc


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"),
        (grpc.StatusCode.UNKNOWN, "Stream removed"),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2"),
        (grpc.StatusCode.UNKNOWN, "Socket closed"),
    ],
)
def test_a_lost_connection_is_unavailable_and_transient(
    code: grpc.StatusCode, details: str
) -> None:
    error = error_from_rpc(_Failed(code, details))

    assert isinstance(error, UnavailableError) and is_transient(error)
    assert (error.code, error.details) == (code, details)


def test_a_task_failure_that_mentions_a_lost_connection_is_not_transient() -> None:
    error = error_from_rpc(_Failed(grpc.StatusCode.INTERNAL, "agent died: Stream removed"))

    assert isinstance(error, InternalError) and not is_transient(error)


def test_a_permanent_error_is_raised_at_once() -> None:
    error = error_from_code(grpc.StatusCode.ABORTED, "ValueError: boom")

    with pytest.raises(TaskFailedError):
        Retrier(60).pause(error)


def test_pauses_are_jittered_below_a_doubling_bound_and_stop_when_the_period_ends() -> None:
    retry = Retrier(0.3)
    error = UnavailableError(grpc.StatusCode.UNAVAILABLE, "down")

    pauses = [retry.pause(error) for _ in range(8)]
    time.sleep(0.3)

    assert all(0 <= p <= MAX_BACKOFF_S for p in pauses)
    assert all(p <= 0.1 * 2**i for i, p in enumerate(pauses))
    with pytest.raises(UnavailableError):
        retry.pause(error)


def test_a_retry_past_the_calls_timeout_is_a_deadline_exceeded_naming_the_cause() -> None:
    retry = Retrier(60, timeout=0.0)

    with pytest.raises(DeadlineExceededError, match="could not be reached; last: UNAVAILABLE"):
        retry.pause(UnavailableError(grpc.StatusCode.UNAVAILABLE, "down"))


def test_a_failed_map_item_pickles_with_its_error() -> None:
    from gpubroker.client._convert import refused_status
    from gpubroker.client._types import TaskResult

    error = error_from_code(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    result = TaskResult.failed(refused_status("echo", error), error)

    back = pickle.loads(pickle.dumps(result))

    assert back.status == result.status and not back.ok
    with pytest.raises(type(error), match="bad"):
        _ = back.outputs


def test_a_failed_tls_handshake_is_not_retried() -> None:
    details = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
        "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED"
    )
    error = error_from_rpc(_Failed(grpc.StatusCode.UNAVAILABLE, details))

    assert isinstance(error, UnavailableError) and not is_transient(error)

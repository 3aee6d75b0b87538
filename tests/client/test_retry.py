"""The retry policy: which failures are retried, how long, and within the call's timeout."""

from __future__ import annotations

import pickle
import time

import grpc
import pytest

from gpubroker.client import (
    DeadlineExceededError,
    InternalError,
    ResourceExhaustedError,
    TaskFailedError,
    UnavailableError,
)
from gpubroker.client._retry import (
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    Retrier,
    is_transient,
    rate_limit_wait,
)
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


RATE_LIMITED = (
    "tenant 'tenant-a' is over its submit rate of 300 tasks/s (submit_rate_per_s, burst 500): "
    "retry in 0.250 s"
)


def test_a_submit_over_the_rate_waits_what_the_broker_names_plus_jitter() -> None:
    error = ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, RATE_LIMITED)

    pauses = [Retrier(60).pause(error) for _ in range(20)]

    assert rate_limit_wait(error) == 0.25 and not is_transient(error)
    assert all(0.25 <= p <= 0.25 + FIRST_BACKOFF_S for p in pauses)
    assert len(set(pauses)) > 1  # jittered: refused callers do not come back together


@pytest.mark.parametrize(
    "details",
    [
        "tenant 'tenant-a' has 100000 tasks queued, the limit (max_queued_per_tenant) is 100000",
        "input 0 is 2147483648 bytes; the limit (max_tensor_bytes) is 1073741824",
        "the month's budget of 10 USD is spent",
    ],
)
def test_other_resource_exhausted_refusals_are_raised_at_once(details: str) -> None:
    error = ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, details)

    assert rate_limit_wait(error) is None
    with pytest.raises(ResourceExhaustedError):
        Retrier(60).pause(error)


def test_a_rate_limit_wait_past_the_calls_timeout_is_a_deadline_exceeded() -> None:
    error = ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, RATE_LIMITED)

    with pytest.raises(DeadlineExceededError, match="refused it for its submit rate"):
        Retrier(60, timeout=0.2).pause(error)

"""Per-tenant quotas: the submit-rate token bucket, the queued-task cap, and their limits."""

from __future__ import annotations

import time

import grpc
import pytest

from gpubroker.broker.config import Limits, Settings
from gpubroker.broker.core.quota import SubmitQuota, TokenBucket
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.errors import LimitExceededError
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.wire import DTYPE_ITEMSIZE, MAX_RANK, crc32c
from tests.support.rpc import AUTH, status_code, submit
from tests.support.waiting import wait_for_async

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
OK = grpc.StatusCode.OK
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- token bucket -----------------------------------------------------------------------------


def test_a_full_bucket_admits_a_burst_then_refuses() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=3, now=0.0)

    taken = [bucket.take(0.0) for _ in range(4)]

    assert taken == [True, True, True, False]


def test_the_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)

    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)
    assert not bucket.take(0.1)
    assert bucket.wait_s(0.1) == pytest.approx(0.1)


def test_the_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=2, now=0.0)

    taken = [bucket.take(3600.0) for _ in range(3)]

    assert taken == [True, True, False]


def test_a_clock_stepping_back_adds_no_tokens() -> None:
    bucket = TokenBucket(rate_per_s=4, burst=1, now=10.0)
    bucket.take(10.0)

    assert not bucket.take(5.0)
    assert not bucket.take(10.125)
    assert bucket.take(10.25)


def test_several_tokens_are_taken_all_or_none() -> None:
    bucket = TokenBucket(rate_per_s=1, burst=5, now=0.0)

    assert bucket.take(0.0, tokens=4)
    assert not bucket.take(0.0, tokens=2)
    assert bucket.take(0.0, tokens=1)


# -- submit quota -----------------------------------------------------------------------------


def _quota(
    clock: FakeClock, queued: dict[str, int] | None = None, max_queued: int = 100
) -> SubmitQuota:
    counts = queued if queued is not None else {}
    return SubmitQuota(
        rate_per_s=2, burst=3, max_queued=max_queued, queued=lambda t: counts.get(t, 0), clock=clock
    )


def _admit(quota: SubmitQuota, tenant: str) -> None:
    with quota.admit(tenant):
        pass


def test_a_tenant_over_its_rate_is_refused_with_the_rate_in_the_message() -> None:
    quota = _quota(FakeClock())
    for _ in range(3):
        _admit(quota, "a")

    with pytest.raises(LimitExceededError) as excinfo:
        _admit(quota, "a")

    message = str(excinfo.value)
    assert "submit rate of 2 tasks/s" in message
    assert "submit_rate_per_s" in message and "burst 3" in message
    assert "retry in 0.500 s" in message


def test_each_tenant_has_its_own_bucket() -> None:
    quota = _quota(FakeClock())
    for _ in range(3):
        _admit(quota, "a")

    _admit(quota, "b")

    with pytest.raises(LimitExceededError):
        _admit(quota, "a")


def test_a_refused_tenant_is_admitted_again_once_tokens_refill() -> None:
    clock = FakeClock()
    quota = _quota(clock)
    for _ in range(3):
        _admit(quota, "a")

    clock.now += 0.5

    _admit(quota, "a")
    with pytest.raises(LimitExceededError):
        _admit(quota, "a")


def test_a_tenant_at_its_queued_cap_is_refused_without_spending_a_token() -> None:
    queued = {"a": 5}
    quota = _quota(FakeClock(), queued, max_queued=5)

    with pytest.raises(LimitExceededError) as excinfo:
        _admit(quota, "a")
    queued["a"] = 4
    for _ in range(3):  # the whole burst is still there
        _admit(quota, "a")

    assert "max_queued_per_tenant" in str(excinfo.value)
    assert "has 5 tasks queued" in str(excinfo.value)


def test_tasks_being_submitted_count_against_the_queued_cap() -> None:
    quota = _quota(FakeClock(), max_queued=2)

    with quota.admit("a"), quota.admit("a"):
        with pytest.raises(LimitExceededError):
            _admit(quota, "a")
        _admit(quota, "b")
    _admit(quota, "a")


def test_a_failed_submit_gives_its_queue_place_back() -> None:
    quota = _quota(FakeClock(), max_queued=1)

    with pytest.raises(RuntimeError), quota.admit("a"):
        raise RuntimeError("upload broke")

    _admit(quota, "a")


# -- queued count in the fair queue ------------------------------------------------------------


def test_the_fair_queue_counts_each_tenants_queued_tasks() -> None:
    queue = FairQueue()
    queue.push("a1", "a", priority=0, seq=1)
    queue.push("a2", "a", priority=0, seq=2)
    queue.push("a2", "a", priority=0, seq=2)  # a second push of a queued task is a no-op
    queue.push("b1", "b", priority=0, seq=3)

    counts = (queue.queued("a"), queue.queued("b"), queue.queued("c"))

    assert counts == (2, 1, 0)


def test_popped_and_removed_tasks_leave_the_count() -> None:
    queue = FairQueue()
    for i in range(3):
        queue.push(f"a{i}", "a", priority=0, seq=i)

    queue.remove("a1")
    queue.remove("a1")
    popped = queue.pop()
    queue.push("a1", "a", priority=0, seq=9)  # requeued after it was removed

    assert popped is not None
    assert queue.queued("a") == 2 == len(queue)
    assert [queue.pop(), queue.pop(), queue.pop()][-1] is None
    assert queue.queued("a") == 0


# -- limits configuration --------------------------------------------------------------------


def test_limits_are_read_from_the_environment() -> None:
    environ = {
        "GPUBROKER_MAX_RANK": "4",
        "GPUBROKER_MAX_DIM": "1000",
        "GPUBROKER_ALLOWED_DTYPES": "float32, int64",
        "GPUBROKER_MAX_QUEUED_PER_TENANT": "7",
        "GPUBROKER_SUBMIT_RATE": "2.5",
        "GPUBROKER_SUBMIT_BURST": "9",
        "GPUBROKER_MAX_TENSOR_BYTES": "123",
    }

    limits = Settings.from_env(environ).limits

    assert (limits.max_rank, limits.max_dim, limits.max_tensor_bytes) == (4, 1000, 123)
    assert limits.allowed_dtypes == {"float32", "int64"}
    assert (limits.max_queued_per_tenant, limits.submit_rate_per_s, limits.submit_burst) == (
        7,
        2.5,
        9,
    )


def test_default_limits_allow_every_wire_dtype_and_rank() -> None:
    limits = Settings.from_env({}).limits

    assert limits == Limits()
    assert limits.allowed_dtypes == set(DTYPE_ITEMSIZE)
    assert limits.max_rank == MAX_RANK


@pytest.mark.parametrize(
    "fields",
    [
        {"max_rank": MAX_RANK + 1},
        {"allowed_dtypes": frozenset({"float128"})},
        {"submit_rate_per_s": 0.0},
        {"submit_burst": 0},
    ],
)
def test_impossible_limits_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Limits(**fields)  # type: ignore[arg-type]


# -- in process: one tenant over quota, the other unaffected ---------------------------------


@pytest.fixture
def stub(broker_channel: grpc.aio.Channel) -> broker_pb2_grpc.BrokerAsyncStub:
    """The Broker service of ``broker_server``, whose limits each test parametrizes."""
    return broker_pb2_grpc.BrokerStub(broker_channel)


async def _code_of_submit(stub: broker_pb2_grpc.BrokerAsyncStub, key: str) -> grpc.StatusCode:
    """The status a one-tensor submit with ``key`` ends with."""
    return await status_code(submit(stub, b"\x01\x02\x03\x04", key))


@pytest.mark.parametrize(
    "broker_overrides", [{"api_keys": KEYS, "limits": Limits(max_queued_per_tenant=3)}]
)
async def test_a_tenant_at_its_queued_cap_is_refused_and_another_is_not(
    stub: broker_pb2_grpc.BrokerAsyncStub,
) -> None:
    # Given no agent, so every accepted task stays queued
    codes_a = [await _code_of_submit(stub, "key-a") for _ in range(4)]
    codes_b = [await _code_of_submit(stub, "key-b") for _ in range(3)]

    assert codes_a == [OK, OK, OK, EXHAUSTED]
    assert codes_b == [OK, OK, OK]


@pytest.mark.parametrize(
    "broker_overrides",
    [{"api_keys": KEYS, "limits": Limits(submit_rate_per_s=0.001, submit_burst=2)}],
)
async def test_a_tenant_over_its_submit_rate_is_refused_and_another_is_not(
    stub: broker_pb2_grpc.BrokerAsyncStub,
) -> None:
    codes_a = [await _code_of_submit(stub, "key-a") for _ in range(3)]
    codes_b = [await _code_of_submit(stub, "key-b") for _ in range(2)]

    assert codes_a == [OK, OK, EXHAUSTED]
    assert codes_b == [OK, OK]


@pytest.mark.parametrize(
    "broker_overrides",
    [{"api_keys": KEYS, "limits": Limits(submit_rate_per_s=20.0, submit_burst=3)}],
)
async def test_a_run_many_batch_is_slowed_to_the_rate_instead_of_refused(
    stub: broker_pb2_grpc.BrokerAsyncStub,
) -> None:
    data = b"\x07"
    tensor = task_pb2.TensorHeader(dtype="uint8", shape=[1], nbytes=1, crc32c=crc32c(data))
    header = broker_pb2.TaskHeader(workload="echo", inputs=[tensor])
    batch = [broker_pb2.InlineTask(index=i, header=header, data=data) for i in range(5)]
    started = time.monotonic()
    call = stub.RunMany(iter([broker_pb2.RunManyRequest(tasks=batch)]), metadata=AUTH)

    async def all_listed() -> bool:
        reply = await stub.ListTasks(broker_pb2.ListTasksRequest(), metadata=AUTH)
        return len(reply.tasks) >= 5

    # No agent: the tasks stay queued, nothing is answered.
    await wait_for_async(all_listed, 10, "the batch to be admitted")
    elapsed = time.monotonic() - started
    call.cancel()

    assert elapsed >= 0.09  # burst 3, then 2 tokens at 20/s
    assert await _code_of_submit(stub, "key-a") == EXHAUSTED  # the batch spent the tokens
    assert await _code_of_submit(stub, "key-b") == OK

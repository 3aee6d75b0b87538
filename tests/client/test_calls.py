"""The calls of ``Client`` and ``AsyncClient`` against a fake broker: keys, errors, retries,
deadlines, cancelling, listing and usage."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import grpc
import pytest
import torch

from gpubroker.client import (
    AuthenticationError,
    DeadlineExceededError,
    NotFoundError,
    TaskCancelledError,
    TaskFailedError,
    TaskState,
    UnavailableError,
)
from tests.fakes.broker import KEY, FakeBroker, run_map


async def test_the_api_key_arrives_as_bearer_metadata_on_every_call(
    client: Any, fake: FakeBroker
) -> None:
    handle = await client.submit("echo", torch.ones(1))
    await handle.status()
    await handle.result()

    assert fake.authorizations == [f"Bearer {KEY}"] * 3


@pytest.mark.parametrize("api_key", ["wrong-key", None])
async def test_a_wrong_or_missing_api_key_is_an_authentication_error(
    connect: Callable[[str | None], Any], api_key: str | None
) -> None:
    with pytest.raises(AuthenticationError, match="unknown API key"):
        await connect(api_key).run("echo", torch.ones(1))


async def test_an_unknown_task_id_is_not_found(client: Any) -> None:
    with pytest.raises(NotFoundError, match="no task 'nope'") as excinfo:
        await client.task("nope").status()

    assert excinfo.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError):
        await client.task("nope").result()


async def test_a_workload_that_raised_is_a_task_failed_error(client: Any) -> None:
    with pytest.raises(TaskFailedError, match="ValueError: boom"):
        await client.run("fail", torch.ones(1))

    handle = await client.submit("fail", torch.ones(1))
    with pytest.raises(TaskFailedError):
        await handle.result()
    status = await handle.wait(timeout=10)
    assert (status.state, status.error_code) == (TaskState.FAILED, "ABORTED")


async def test_a_failed_task_carries_the_remote_type_and_the_agents_whole_message(
    client: Any, fake: FakeBroker
) -> None:
    fake.failure_message = (
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 8x16)\n"
        "  at graph node linear (aten.linear.default)"
    )

    with pytest.raises(TaskFailedError) as ran:
        await client.run("fail", torch.ones(1))
    handle = await client.submit("fail", torch.ones(1))
    with pytest.raises(TaskFailedError) as fetched:
        await handle.result()
    (mapped,) = await run_map(client, "fail", [torch.ones(1)])

    assert isinstance(mapped.error, TaskFailedError)
    for error in (ran.value, fetched.value, mapped.error):
        assert error.remote_type == "RuntimeError"
        assert error.details == fake.failure_message
        assert str(error) == f"ABORTED: {fake.failure_message}"


async def test_submit_is_retried_on_unavailable_with_the_same_request_id(
    client: Any, fake: FakeBroker
) -> None:
    fake.unavailable_submits = 2

    handle = await client.submit("echo", torch.ones(1))

    assert len(fake.request_ids) == 3 and len(set(fake.request_ids)) == 1
    assert list(fake.tasks) == [handle.task_id]


async def test_submit_gives_up_once_retry_for_has_passed_and_keeps_its_request_id(
    connect: Callable[..., Any], fake: FakeBroker
) -> None:
    fake.unavailable_submits = 10_000
    client = connect(KEY, retry_for=0.5)

    started = time.monotonic()
    with pytest.raises(UnavailableError):
        await client.submit("echo", torch.ones(1), request_id="mine")

    assert 0.4 < time.monotonic() - started < 5
    assert len(fake.request_ids) > 2 and set(fake.request_ids) == {"mine"}


async def test_a_client_that_never_retries_raises_the_first_unavailable(
    connect: Callable[..., Any], fake: FakeBroker
) -> None:
    fake.unavailable_submits = 1

    with pytest.raises(UnavailableError):
        await connect(KEY, retry_for=0).submit("echo", torch.ones(1))

    assert len(fake.request_ids) == 1


async def test_the_run_timeout_becomes_the_calls_deadline(client: Any, fake: FakeBroker) -> None:
    await client.run("echo", torch.ones(1), timeout=30)
    await client.run("echo", torch.ones(1))

    first, second = fake.time_remaining
    # gRPC sends the time left as the timeout header, reckoned from a clock reading its core
    # caches per batch of work: on a loaded machine the server has seen up to ~0.1 s more
    # than the 30 s asked. A deadline of some other size, or none, still fails here.
    assert first is not None and 29 < first <= 30.5
    assert second is None


async def test_waiting_longer_than_the_timeout_is_a_deadline_exceeded_timeout_error(
    client: Any,
) -> None:
    handle = await client.submit("hold", torch.ones(1))

    with pytest.raises(DeadlineExceededError) as excinfo:
        await handle.result(timeout=0.2)
    with pytest.raises(TimeoutError):
        await client.run("hold", torch.ones(1), timeout=0.2)

    assert excinfo.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert not await handle.done()


async def test_a_cancelled_task_is_final_and_its_result_raises_task_cancelled(
    client: Any,
) -> None:
    handle = await client.submit("hold", torch.ones(1))
    assert (await handle.status()).state is TaskState.QUEUED

    status = await handle.cancel()

    assert status.state is TaskState.CANCELLED and await handle.done()
    assert (await handle.wait()).state is TaskState.CANCELLED
    with pytest.raises(TaskCancelledError, match="cancelled by owner"):
        await handle.result()


async def test_listing_follows_pages_newest_first_and_filters_by_state(client: Any) -> None:
    held = [(await client.submit("hold", torch.ones(1))).task_id for _ in range(5)]
    await client.run("echo", torch.ones(1))

    queued = await client.list_tasks([TaskState.QUEUED], limit=4)
    everything = await client.list_tasks([TaskState.QUEUED, TaskState.SUCCEEDED])

    assert [t.task_id for t in queued] == held[::-1][:4]
    assert len(everything) == 6 and everything[0].state is TaskState.SUCCEEDED


async def test_usage_is_reported_in_exact_dollars(client: Any) -> None:
    usage = await client.usage()

    assert (usage.tenant, usage.tasks, usage.cost_usd) == ("a", 2, Decimal("0.017750000"))
    assert usage.monthly_budget_usd is None

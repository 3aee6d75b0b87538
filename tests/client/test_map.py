"""``map`` of ``Client`` and ``AsyncClient`` against a fake broker: order, batches, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from gpubroker.client import (
    Client,
    GpuBrokerError,
    InvalidArgumentError,
    TaskFailedError,
    TaskResult,
    TaskState,
)
from tests.fakes.broker import KEY, FakeBroker, run_map
from tests.support.tensors import assert_same_tensors, mixed_torch_inputs


async def test_map_returns_results_in_input_order_in_batches_bit_exact(
    client: Any, fake: FakeBroker
) -> None:
    items = [[t, t] for t in mixed_torch_inputs()] * 3  # 27 items, answered in reverse per batch

    results = await run_map(client, "echo", items, batch=4, window=6)

    assert len(results) == len(items)
    for sent, result in zip(items, results, strict=True):
        assert_same_tensors(sent, result.outputs)
    assert max(fake.map_batches) <= 4
    assert sum(fake.map_batches) == len(items)
    assert set(fake.request_ids) == {""}  # a map task carries no idempotency key


async def test_map_fetches_results_that_did_not_ride_along(client: Any) -> None:
    items = [np.arange(5, dtype=np.int16), np.ones((2, 2))]

    results = await run_map(client, "fetch", items)

    assert [r.output.tolist() for r in results] == [list(range(5)), [[1.0, 1.0], [1.0, 1.0]]]
    assert all(isinstance(r.output, np.ndarray) for r in results)


@pytest.mark.parametrize(
    ("workload", "error"), [("fail", TaskFailedError), ("refuse", InvalidArgumentError)]
)
async def test_a_failed_item_is_in_its_place_with_its_error_and_the_rest_are_delivered(
    client: Any, workload: str, error: type[GpuBrokerError]
) -> None:
    items = [torch.ones(1), torch.ones(2)]

    (failed,) = await run_map(client, workload, items[:1])
    good = await run_map(client, "echo", items)

    assert not failed.ok and isinstance(failed.error, error)
    assert failed.status.error_code == failed.error.code.name
    with pytest.raises(error):
        _ = failed.output
    with pytest.raises(error):
        _ = failed.outputs
    assert [r.ok for r in good] == [True, True]


async def test_map_delivers_every_item_around_failures_in_input_order(client: Any) -> None:
    items = [torch.full((1,), float(i)) for i in range(6)]

    results = await run_map(client, "echo", [*items[:3], "not a tensor", *items[3:]], batch=2)

    assert [r.ok for r in results] == [True, True, True, False, True, True, True]
    assert [r.output.item() for r in results if r.ok] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


async def test_a_bad_item_fails_in_place_as_invalid_argument_and_nothing_is_sent_for_it(
    client: Any, fake: FakeBroker
) -> None:
    results = await run_map(client, "echo", [torch.ones(1), "not a tensor", torch.ones(1)])

    bad = results[1]
    assert isinstance(bad.error, InvalidArgumentError) and "map item 1" in bad.error.details
    assert isinstance(bad.error.__cause__, TypeError)
    assert (bad.task_id, bad.status.state) == ("", TaskState.FAILED)
    assert sum(fake.map_batches) == 2


async def test_raise_on_error_raises_a_failed_item_in_its_turn(client: Any) -> None:
    with pytest.raises(TaskFailedError):
        await run_map(client, "fail", [torch.ones(1)], raise_on_error=True)


async def test_an_input_iterator_that_raises_ends_the_map_after_the_items_before_it(
    broker: tuple[FakeBroker, str],
) -> None:
    def items() -> Iterator[torch.Tensor]:
        yield torch.ones(1)
        yield torch.ones(2)
        raise LookupError("no more rows")

    def run() -> list[TaskResult]:
        received = []
        with Client(broker[1], KEY) as client, pytest.raises(LookupError, match="no more rows"):
            for result in client.map("echo", items()):
                received.append(result)
        return received

    received = await asyncio.to_thread(run)  # the fake serves on this test's event loop

    assert [r.output.shape for r in received] == [(1,), (2,)]


async def test_map_of_nothing_is_empty(client: Any) -> None:
    assert await run_map(client, "echo", []) == []

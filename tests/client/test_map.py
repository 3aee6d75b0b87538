"""``map`` of ``Client`` and ``AsyncClient`` against a fake broker: order, batches, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from gpubroker.client import (
    InvalidArgumentError,
    TaskFailedError,
)
from tests.fakes.broker import FakeBroker, run_map
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
async def test_map_raises_a_tasks_error_in_its_turn(
    client: Any, workload: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await run_map(client, workload, [torch.ones(1)])


async def test_map_raises_a_bad_item_in_its_turn_and_sends_nothing_for_it(
    client: Any, fake: FakeBroker
) -> None:
    with pytest.raises(TypeError):
        await run_map(client, "echo", [torch.ones(1), "not a tensor", torch.ones(1)])


async def test_map_of_nothing_is_empty(client: Any) -> None:
    assert await run_map(client, "echo", []) == []

"""Dynamic batching: fair shares of a call's time, input checks, and stacked calls on a runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
import torch

from gpubroker.gpu_agent.batcher import Batcher, check_inputs, shares_ns
from gpubroker.gpu_agent.errors import WorkloadArgumentError, WorkloadFailedError
from gpubroker.gpu_agent.model import ModelRef
from gpubroker.gpu_agent.model_loader import LoadedModel, load_model
from gpubroker.gpu_agent.runner import Runner, RunOutcome, detect_device
from tests.gpu_agent.models import FEATURES, model_file
from tests.support.waiting import wait_for


@pytest.mark.parametrize(
    ("total_ns", "rows", "expected"),
    [
        (10, [1, 1, 1], [4, 3, 3]),
        (100, [1, 3], [25, 75]),
        (7, [2, 2, 3], [2, 2, 3]),
        (0, [5, 1], [0, 0]),
        (1, [1, 1], [1, 0]),
        (999_999_999, [1] * 64, [15_625_000] * 63 + [15_624_999]),
    ],
)
def test_shares_are_by_rows_with_the_largest_remainders_rounded_up(
    total_ns: int, rows: list[int], expected: list[int]
) -> None:
    assert shares_ns(total_ns, rows) == expected


@pytest.mark.parametrize("seed", range(20))
def test_shares_always_add_up_to_exactly_the_measured_time(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 50, (int(torch.randint(1, 65, (1,), generator=generator)),)).tolist()
    total = int(torch.randint(0, 10**12, (1,), generator=generator))

    shares = shares_ns(total, rows)

    assert sum(shares) == total
    assert all(
        abs(s * sum(rows) - total * r) < sum(rows) for s, r in zip(shares, rows, strict=True)
    )


@pytest.mark.parametrize(("total_ns", "rows"), [(-1, [1]), (5, []), (5, [1, 0])])
def test_shares_of_nonsense_are_refused(total_ns: int, rows: list[int]) -> None:
    with pytest.raises(ValueError, match="need total_ns"):
        shares_ns(total_ns, rows)


_MLP_META = {
    "inputs": [{"dtype": "float32", "shape": [None, 8]}],
    "batch_dim_varies": True,
}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], "takes 1 inputs, got 0"),
        ([torch.ones(2, 8, dtype=torch.float64)], r"float32 of shape \[Nx8\], got float64"),
        ([torch.ones(2, 9)], r"got float32 of shape \[2, 9\]"),
        ([torch.ones(8)], r"got float32 of shape \[8\]"),
    ],
)
def test_inputs_that_do_not_fit_the_models_specs_are_refused_saying_how(
    inputs: list[torch.Tensor], message: str
) -> None:
    with pytest.raises(WorkloadArgumentError, match=message):
        check_inputs(_MLP_META, inputs)


def test_inputs_that_fit_pass_at_any_batch_size() -> None:
    for rows in (1, 5, 300):
        check_inputs(_MLP_META, [torch.ones(rows, 8)])


@pytest.fixture
async def runner() -> AsyncIterator[Runner]:
    runner = Runner(detect_device("cpu"), 2, {})
    yield runner
    runner.close()


def _loaded(name: str) -> LoadedModel:
    return load_model(model_file(name))


def _ref(model: LoadedModel, max_batch: int, delay_s: float = 5.0) -> ModelRef:
    return ModelRef(model.model_id, 0, max_batch_size=max_batch, max_queue_delay_s=delay_s)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
async def test_64_single_row_tasks_run_as_fewer_calls_with_the_unbatched_results(
    runner: Runner, name: str
) -> None:
    model = _loaded(name)
    rows = [torch.randn(1, *FEATURES[name]) for _ in range(64)]
    alone = Batcher(runner)
    expected = [await alone.run(model, _ref(model, 1), [row]) for row in rows]
    batcher = Batcher(runner)

    results = await asyncio.gather(*(batcher.run(model, _ref(model, 16), [r]) for r in rows))

    assert alone.calls == 64 and batcher.calls == 4
    assert all(result.batch_tasks == 16 for result in results)
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got.outputs, want.outputs, rtol=1e-5, atol=1e-6)


async def test_the_shares_of_one_call_add_up_to_its_time(runner: Runner) -> None:
    model = _loaded("mlp")
    batcher = Batcher(runner)
    sizes = [1, 2, 3, 4, 6]

    results = await asyncio.gather(
        *(batcher.run(model, _ref(model, 16), [torch.randn(n, 8)]) for n in sizes)
    )

    assert batcher.calls == 1
    assert [r.batch_tasks for r in results] == [5] * 5
    assert [r.outputs[0].shape[0] for r in results] == sizes
    shares = [round(r.compute_seconds * 1e9) for r in results]
    assert shares == shares_ns(sum(shares), sizes)


async def test_a_lone_task_runs_after_the_queue_delay(runner: Runner) -> None:
    model = _loaded("mlp")
    batcher = Batcher(runner)

    result = await asyncio.wait_for(
        batcher.run(model, _ref(model, 64, 0.01), [torch.ones(1, 8)]), 5
    )

    assert result.batch_tasks == 1 and batcher.calls == 1


class _BusyRunner(Runner):
    """A runner whose model calls wait until ``free`` is set: a device busy for as long."""

    def __init__(self) -> None:
        super().__init__(detect_device("cpu"), 1, {})
        self.free = asyncio.Event()

    async def call_model(self, model: LoadedModel, inputs: Sequence[torch.Tensor]) -> RunOutcome:
        await self.free.wait()
        return await super().call_model(model, inputs)


async def test_a_batch_whose_delay_ran_out_takes_tasks_until_a_slot_is_free() -> None:
    runner = _BusyRunner()
    model = _loaded("mlp")
    batcher = Batcher(runner)
    try:
        big = asyncio.create_task(batcher.run(model, _ref(model, 4, 0.0), [torch.ones(9, 8)]))
        first = asyncio.create_task(batcher.run(model, _ref(model, 8, 0.01), [torch.ones(1, 8)]))
        await wait_for(lambda: batcher.ready_batches == 1, 5, "the delay to run out")
        later = [batcher.run(model, _ref(model, 8, 0.01), [torch.ones(1, 8)]) for _ in range(4)]
        rest = [asyncio.ensure_future(call) for call in later]
        await asyncio.sleep(0)  # let them join the open batch

        runner.free.set()
        results = await asyncio.gather(first, *rest)

        assert (await big).batch_tasks == 1
        assert [r.batch_tasks for r in results] == [5] * 5
        assert batcher.calls == 2
    finally:
        runner.close()


async def test_a_task_with_more_rows_than_a_batch_runs_alone_at_once(runner: Runner) -> None:
    model = _loaded("mlp")
    batcher = Batcher(runner)

    result = await batcher.run(model, _ref(model, 4, delay_s=60), [torch.ones(9, 8)])

    assert result.batch_tasks == 1 and result.outputs[0].shape == (9, 4)


async def test_a_task_cancelled_while_its_batch_waits_leaves_the_batch(runner: Runner) -> None:
    model = _loaded("mlp")
    batcher = Batcher(runner)
    ref = _ref(model, 3, delay_s=60)
    leaving = asyncio.create_task(batcher.run(model, ref, [torch.ones(1, 8)]))
    staying = asyncio.create_task(batcher.run(model, ref, [torch.ones(1, 8)]))
    await wait_for(lambda: batcher._pending, what="a waiting batch")

    leaving.cancel()
    await asyncio.wait({leaving})
    rest = [asyncio.create_task(batcher.run(model, ref, [torch.ones(1, 8)])) for _ in range(2)]
    done = await asyncio.wait_for(asyncio.gather(staying, *rest), 5)

    assert leaving.cancelled()
    assert batcher.calls == 1 and [r.batch_tasks for r in done] == [3, 3, 3]


async def test_a_failed_call_fails_every_task_of_its_batch(runner: Runner) -> None:
    model = _loaded("embedding")
    batcher = Batcher(runner)
    ref = _ref(model, 2)
    good, bad = torch.tensor([[1, 2]]), torch.tensor([[1, 99]])

    results = await asyncio.gather(
        batcher.run(model, ref, [good]), batcher.run(model, ref, [bad]), return_exceptions=True
    )

    assert all(isinstance(r, WorkloadFailedError) for r in results)
    assert "embedding (aten.embedding.default)" in str(results[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_batching_on_cuda_matches_unbatched_calls() -> None:
    runner = Runner(detect_device("cuda"), 2, {})
    try:
        model = load_model(model_file("mlp"), device="cuda")
        rows = [torch.randn(1, 8) for _ in range(64)]
        alone = [await Batcher(runner).run(model, _ref(model, 1), [r]) for r in rows]
        batcher = Batcher(runner)
        batched = await asyncio.gather(*(batcher.run(model, _ref(model, 64), [r]) for r in rows))
    finally:
        runner.close()

    assert batcher.calls == 1
    for got, want in zip(batched, alone, strict=True):
        assert got.outputs[0].device.type == "cpu"
        torch.testing.assert_close(got.outputs, want.outputs, rtol=1e-4, atol=1e-5)
    assert all(r.compute_seconds > 0 for r in batched)

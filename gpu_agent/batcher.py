"""Dynamic batching of model tasks, in the style of Triton's dynamic batcher.

Model tasks waiting here for the same model, with inputs of the same dtypes and the same
non-batch dimensions, are stacked along dimension 0 into one call of up to ``max_batch_size``
rows. The first task of a batch waits at most ``max_queue_delay_s`` for others; a batch that
is full runs at once, and a task with more rows than a batch holds runs alone. Calls run on the
runner's worker threads, so no more than its slots run on the device at once, and a batch whose
delay has run out while every slot is busy stays open, taking more tasks, until a slot frees
(as Triton forms a batch when a model instance is free): sealed early, it would only wait in
the runner's queue while the tasks arriving behind it started a batch of their own. Measured
with 16 callers sending one row each, sealing on the timer alone gave batches of 1 to 7 tasks,
this rule 15. The outputs are split back by rows, and each task's compute time is its share of
the call's, by rows (``shares_ns``). A task withdrawn while its batch waits leaves the batch;
one withdrawn while its batch runs just loses its result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gpubroker.gpu_agent.errors import WorkloadArgumentError, WorkloadFailedError
from gpubroker.gpu_agent.model import ModelRef
from gpubroker.gpu_agent.model_loader import LoadedModel
from gpubroker.gpu_agent.runner import Runner, RunOutcome

__all__ = ["Batcher", "check_inputs", "shares_ns"]

logger = logging.getLogger(__name__)

_BatchKey = tuple[str, tuple[tuple[torch.dtype, tuple[int, ...]], ...]]


def shares_ns(total_ns: int, rows: Sequence[int]) -> list[int]:
    """Splits ``total_ns`` by ``rows`` into integer shares that add up to exactly ``total_ns``.

    Each share is the floor of its exact quota; the nanoseconds left go one each to the largest
    remainders (the earlier task first on a tie): Hamilton's largest-remainder method.

    Raises:
        ValueError: ``total_ns`` is negative, ``rows`` is empty or a count is below 1.
    """
    if total_ns < 0 or not rows or min(rows) < 1:
        raise ValueError(f"need total_ns >= 0 and rows >= 1 each, got {total_ns} and {rows}")
    all_rows = sum(rows)
    shares = [total_ns * r // all_rows for r in rows]
    remainders = [total_ns * r % all_rows for r in rows]
    left = total_ns - sum(shares)  # fewer than len(rows): each remainder is under one
    for index in sorted(range(len(rows)), key=lambda i: (-remainders[i], i))[:left]:
        shares[index] += 1
    return shares


def check_inputs(metadata: dict[str, Any], inputs: Sequence[torch.Tensor]) -> None:
    """Checks inputs against a model's input specs (count, dtype, shape; ``null`` varies).

    Raises:
        WorkloadArgumentError: an input does not fit its spec; the message says how.
    """
    specs = metadata.get("inputs", [])
    if len(inputs) != len(specs):
        raise WorkloadArgumentError(f"the model takes {len(specs)} inputs, got {len(inputs)}")
    for index, (tensor, spec) in enumerate(zip(inputs, specs, strict=True)):
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = list(spec["shape"])
        fits = len(shape) == tensor.dim() and all(
            want is None or want == got for want, got in zip(shape, tensor.shape, strict=True)
        )
        if dtype != spec["dtype"] or not fits:
            wanted = "x".join("N" if s is None else str(s) for s in shape)
            raise WorkloadArgumentError(
                f"model input {index} must be {spec['dtype']} of shape [{wanted}], "
                f"got {dtype} of shape {list(tensor.shape)}"
            )
    if _batchable(metadata) and len({t.shape[0] for t in inputs}) > 1:
        raise WorkloadArgumentError(
            f"the model's inputs must have the same batch size, got {[t.shape[0] for t in inputs]}"
        )


def _batchable(metadata: dict[str, Any]) -> bool:
    specs = metadata.get("inputs", [])
    return bool(metadata.get("batch_dim_varies")) and all(
        spec["shape"] and spec["shape"][0] is None for spec in specs
    )


@dataclass(eq=False)
class _Entry:
    inputs: Sequence[torch.Tensor]
    rows: int
    future: asyncio.Future[RunOutcome]


@dataclass(eq=False)
class _Pending:
    model: LoadedModel
    max_rows: int
    entries: list[_Entry] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None
    ready: bool = False
    """Its delay has run out: it runs as soon as a slot is free."""


class Batcher:
    """Stacks compatible model tasks into shared calls on the runner."""

    def __init__(self, runner: Runner) -> None:
        self.calls = 0
        """Model calls made (a batch or a lone task is one call), for tests and logs."""
        self._runner = runner
        self._pending: dict[_BatchKey, _Pending] = {}
        self._ready: list[_BatchKey] = []
        """Batches whose delay ran out while every slot was busy, oldest first."""
        self._in_flight = 0
        """Model calls started by this batcher and not yet ended."""
        self._running: set[asyncio.Task[None]] = set()

    @property
    def ready_batches(self) -> int:
        """Batches whose delay has run out, waiting for a free slot (taking tasks meanwhile)."""
        return sum(
            1 for key in set(self._ready) if (p := self._pending.get(key)) is not None and p.ready
        )

    async def run(
        self, model: LoadedModel, ref: ModelRef, inputs: Sequence[torch.Tensor]
    ) -> RunOutcome:
        """Runs ``model`` on one task's inputs, in a batch with others when it can.

        Cancelling the caller withdraws the task from a batch that has not started.

        Raises:
            WorkloadArgumentError: the inputs do not fit the model's input specs.
            WorkloadFailedError: the model call failed (for every task of the batch).
        """
        check_inputs(model.metadata, inputs)
        max_rows = min(ref.max_batch_size, int(model.metadata.get("max_batch") or 1))
        rows = inputs[0].shape[0] if inputs else 0
        if max_rows <= 1 or not _batchable(model.metadata) or not 0 < rows < max_rows:
            self._in_flight += 1
            try:
                outcome = await self._runner.call_model(model, inputs)
            finally:
                self._slot_freed()
            self.calls += 1
            return RunOutcome(outcome.outputs, outcome.compute_seconds, batch_tasks=1)
        entry = _Entry(inputs, rows, asyncio.get_running_loop().create_future())
        key: _BatchKey = (model.model_id, tuple((t.dtype, tuple(t.shape[1:])) for t in inputs))
        self._enqueue(key, model, entry, max_rows, ref.max_queue_delay_s)
        try:
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            self._withdraw(key, entry)
            raise

    async def close(self) -> None:
        """Runs the batches still waiting and waits for every call to end."""
        for key in list(self._pending):
            self._flush(key)
        if self._running:
            await asyncio.wait(list(self._running))

    def _enqueue(
        self, key: _BatchKey, model: LoadedModel, entry: _Entry, max_rows: int, delay_s: float
    ) -> None:
        pending = self._pending.get(key)
        if pending is not None and pending.rows + entry.rows > pending.max_rows:
            self._flush(key)
            pending = None
        if pending is None:
            pending = self._pending[key] = _Pending(model, max_rows)
            loop = asyncio.get_running_loop()
            pending.timer = loop.call_later(delay_s, self._expire, key, pending)
        pending.entries.append(entry)
        pending.rows += entry.rows
        if pending.rows >= pending.max_rows:
            self._flush(key)

    def _expire(self, key: _BatchKey, pending: _Pending) -> None:
        if self._pending.get(key) is not pending:
            return
        pending.timer = None
        if self._in_flight < self._runner.slots:
            self._flush(key)
        else:
            pending.ready = True
            self._ready.append(key)

    def _slot_freed(self) -> None:
        self._in_flight -= 1
        while self._ready and self._in_flight < self._runner.slots:
            key = self._ready.pop(0)
            pending = self._pending.get(key)
            if pending is not None and pending.ready:
                self._flush(key)

    def _withdraw(self, key: _BatchKey, entry: _Entry) -> None:
        entry.future.cancel()  # a result or failure that comes later is dropped, not logged
        pending = self._pending.get(key)
        if pending is None or entry not in pending.entries:
            return  # its batch is running already: the result is discarded
        pending.entries.remove(entry)
        pending.rows -= entry.rows
        if not pending.entries:
            del self._pending[key]
            if pending.timer is not None:
                pending.timer.cancel()

    def _flush(self, key: _BatchKey) -> None:
        pending = self._pending.pop(key)
        if pending.timer is not None:
            pending.timer.cancel()
        self._in_flight += 1
        task = asyncio.create_task(self._call(pending), name=f"batch-{key[0][:12]}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _call(self, pending: _Pending) -> None:
        entries = pending.entries
        try:
            stacked = _stack([entry.inputs for entry in entries])
            outcome = await self._runner.call_model(pending.model, stacked)
            self.calls += 1
            results = _split(outcome, [entry.rows for entry in entries])
        except Exception as exc:  # the call's failure is every task's failure
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        finally:
            self._slot_freed()
        logger.debug("model %s: %d tasks in one call", pending.model.model_id, len(entries))
        for entry, result in zip(entries, results, strict=True):
            if not entry.future.done():
                entry.future.set_result(result)


def _stack(inputs: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    if len(inputs) == 1:
        return list(inputs[0])
    return [torch.cat(column) for column in zip(*inputs, strict=True)]


def _split(outcome: RunOutcome, rows: Sequence[int]) -> list[RunOutcome]:
    total = sum(rows)
    for index, output in enumerate(outcome.outputs):
        if output.dim() == 0 or output.shape[0] != total:
            raise WorkloadFailedError(
                f"model output {index} has shape {list(output.shape)} for a batch of {total} "
                f"rows: its batch dimension must come first"
            )
    shares = shares_ns(round(outcome.compute_seconds * 1e9), rows)
    results, start = [], 0
    for count, share in zip(rows, shares, strict=True):
        outputs = tuple(output[start : start + count] for output in outcome.outputs)
        results.append(RunOutcome(outputs, share / 1e9, batch_tasks=len(rows)))
        start += count
    return results

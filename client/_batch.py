"""Pure helpers for ``map`` (the ``RunMany`` call), shared by ``Client`` and ``AsyncClient``.

``map`` runs one small task per input item on a single call: items are encoded and packed
into batches (``pack``), at most ``window`` tasks are in flight, and outcomes, which arrive in
completion order, are handed back in input order (``Reorder``). Every item comes back as a
``TaskResult``, a failed one in its place with its ``error`` (so every success billed is handed
over); only the caller's own input iterator raising ends the results early. No I/O here:
``MapRun`` holds the blocking client's side of one call, and the async client's lives in
``_async``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from gpubroker.client._convert import prepare_task, refused_status, status_from_proto, task_error
from gpubroker.client._models import workload_name
from gpubroker.client._requirement import requirement
from gpubroker.client._types import GpuRequirement, Model, TaskResult, TaskStatus
from gpubroker.client.codec import ArrayLike, OutputKind, decode, empty_buffer
from gpubroker.client.errors import (
    GpuBrokerError,
    InternalError,
    InvalidArgumentError,
    error_from_code,
)
from gpubroker.protos import broker_pb2
from gpubroker.protos.states import FailureCode, TaskState
from gpubroker.protos.wire import INLINE_MAX_BYTES, Assembler

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_WINDOW",
    "Encoder",
    "MapItem",
    "MapRun",
    "Packer",
    "Ready",
    "Reorder",
    "encode_item",
    "failed_input",
    "map_encoder",
    "pack",
]

DEFAULT_WINDOW = 1024
"""Tasks of one ``map`` call in flight at once."""

DEFAULT_BATCH = 64
"""Tasks per request message."""


Ready = TaskResult | TaskStatus | Exception
"""An item ready to hand out: its result (maybe failed), the status of a task whose outputs
are too large to ride along (to fetch with ``GetResult``), or the input iterator's error."""


@dataclass(frozen=True, slots=True)
class MapItem:
    """One encoded task of a ``map`` call, or why it could not be sent: a ``TaskResult`` that
    failed in place, or the error the caller's input iterator raised (which ends the results)."""

    index: int
    task: broker_pb2.InlineTask | None
    output: OutputKind
    error: TaskResult | Exception | None = None


def encode_item(
    index: int,
    inputs: ArrayLike | Sequence[ArrayLike],
    *,
    workload: str,
    params: Mapping[str, Any],
    priority: int,
    timeout: float | None,
    output: OutputKind | None,
    requires: GpuRequirement | None = None,
) -> MapItem:
    """Encodes one item; a bad input becomes the item's failed result (INVALID_ARGUMENT)."""
    try:
        prepared = prepare_task(
            workload,
            inputs,
            params,
            priority=priority,
            request_id=None,
            timeout=timeout,
            output=output,
            requires=requires,
        )
    except (TypeError, ValueError) as exc:
        error: GpuBrokerError = InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT, f"map item {index}: {exc}"
        )
        error.__cause__ = exc
        return MapItem(index, None, output or "torch", _refused(workload, error))
    prepared.header.request_id = ""  # a map call is never retried as a whole: no dedup needed
    data = b"".join(prepared.buffers)
    if len(data) > INLINE_MAX_BYTES:
        error = error_from_code(
            FailureCode.INVALID_ARGUMENT,
            f"map item {index} has {len(data)} bytes of inputs; map takes at most "
            f"{INLINE_MAX_BYTES} per task (use run or submit for larger ones)",
        )
        return MapItem(index, None, prepared.output, _refused(workload, error))
    task = broker_pb2.InlineTask(index=index, header=prepared.header, data=data)
    return MapItem(index, task, prepared.output)


Encoder = Callable[[int, "ArrayLike | Sequence[ArrayLike]"], MapItem]
"""``encode_item`` with everything but the index and the inputs bound."""


def map_encoder(
    workload: str | Model,
    params: Mapping[str, Any],
    *,
    window: int,
    batch: int,
    priority: int,
    timeout: float | None,
    output: OutputKind | None,
    gpu: str | None,
    min_gpu_memory: int | str | None,
) -> Encoder:
    """Checks a ``map`` call's arguments, before any item is read, and binds them."""
    if window < 1 or batch < 1:
        raise ValueError(f"window and batch must be at least 1, got {window} and {batch}")
    return functools.partial(
        encode_item,
        workload=workload_name(workload),
        params=params,
        priority=priority,
        timeout=timeout,
        output=output,
        requires=requirement(gpu, min_gpu_memory),
    )


def pack(items: Sequence[MapItem]) -> broker_pb2.RunManyRequest:
    """One request message carrying the items that encoded cleanly."""
    return broker_pb2.RunManyRequest(tasks=[i.task for i in items if i.task is not None])


class Packer:
    """Collects encoded items into request messages of at most ``batch`` tasks."""

    def __init__(self, batch: int) -> None:
        self._batch = batch
        self._pending: list[MapItem] = []

    def add(self, item: MapItem) -> broker_pb2.RunManyRequest | None:
        """Adds an item; returns a full message to send, if one is full now."""
        if item.task is not None:
            self._pending.append(item)
        return self.flush() if len(self._pending) >= self._batch else None

    def flush(self) -> broker_pb2.RunManyRequest | None:
        """The message of the items collected so far, if any."""
        if not self._pending:
            return None
        message = pack(self._pending)
        self._pending = []
        return message


def _refused(workload: str, error: GpuBrokerError) -> TaskResult:
    return TaskResult.failed(refused_status(workload, error), error)


@dataclass
class Reorder:
    """Outcomes in, results out in input order. An item whose result is not inline is returned
    as its task's status, for the caller to fetch with ``GetResult``."""

    outputs: dict[int, OutputKind] = field(default_factory=dict)
    """Output kind of every item sent and not yet handed out."""
    workloads: dict[int, str] = field(default_factory=dict)
    """Workload of every item sent and not yet answered (for a refusal's status)."""
    _ready: dict[int, Ready] = field(default_factory=dict)
    _next: int = 0

    def sent(self, item: MapItem) -> None:
        """Notes an item; an item that failed to encode is ready at once (as its error)."""
        self.outputs[item.index] = item.output
        if item.error is not None:
            self._ready[item.index] = item.error
        elif item.task is not None:
            self.workloads[item.index] = item.task.header.workload

    def add(self, outcome: broker_pb2.InlineOutcome) -> None:
        """Takes one outcome from the broker."""
        index = outcome.index
        if index not in self.outputs or index in self._ready:
            raise error_from_code(
                FailureCode.INTERNAL, f"the broker answered for unknown item {index}"
            )
        workload = self.workloads.pop(index, "")
        self._ready[index] = _result(outcome, self.outputs[index], workload)

    def pop_ready(self) -> list[tuple[Ready, OutputKind]]:
        """The next items in input order, as long as they are ready, with their output kinds."""
        ready = []
        while self._next in self._ready:
            index = self._next
            self._next += 1
            ready.append((self._ready.pop(index), self.outputs.pop(index)))
        return ready

    @property
    def pending(self) -> int:
        """Items sent and not yet handed out."""
        return len(self.outputs)


def _result(outcome: broker_pb2.InlineOutcome, output: OutputKind, workload: str) -> Ready:
    if not outcome.HasField("task"):
        # A refused item: its code is any gRPC status name (e.g. RESOURCE_EXHAUSTED).
        code = outcome.error_code or FailureCode.INTERNAL
        return _refused(workload, error_from_code(code, outcome.error_message))
    status = status_from_proto(outcome.task)
    if status.state is not TaskState.SUCCEEDED:
        return TaskResult.failed(status, task_error(status))
    if not outcome.data_inline:
        return status  # large outputs: fetched by the caller
    try:
        assembler = Assembler(status.outputs, empty_buffer)
        assembler.feed(outcome.data)
        buffers = assembler.finish()
    except ValueError as exc:
        message = f"result of task {status.task_id}: {exc}"
        return TaskResult.failed(status, error_from_code(FailureCode.DATA_LOSS, message))
    outputs = tuple(
        decode(meta, buf, output) for meta, buf in zip(status.outputs, buffers, strict=True)
    )
    return TaskResult(task_id=status.task_id, outputs=outputs, status=status)


def failed_input(index: int, exc: Exception) -> MapItem:
    """The item standing for an input iterator that raised: its error ends the results
    (after every item sent before it)."""
    return MapItem(index, None, "torch", exc)


class MapRun:
    """One blocking ``Client.map`` call's two sides: requests (sent from gRPC's thread) and
    outcomes (taken on the caller's)."""

    def __init__(
        self,
        encoder: Encoder,
        inputs: Iterable[ArrayLike | Sequence[ArrayLike]],
        window: int,
        batch: int,
    ) -> None:
        self._encoder = encoder
        self._inputs = inputs
        self._batch = batch
        self._room = threading.Semaphore(window)
        self._lock = threading.Lock()
        self._reorder = Reorder()
        self._closed = False

    def requests(self) -> Iterator[broker_pb2.RunManyRequest]:
        """Encodes and packs the items, never more than ``window`` in flight."""
        packer = Packer(self._batch)
        count = 0
        try:
            for inputs in self._inputs:
                item = self._encoder(count, inputs)
                count += 1
                if item.task is not None and not self._room.acquire(blocking=False):
                    if (message := packer.flush()) is not None:
                        yield message  # send what is packed before waiting for room
                    self._room.acquire()
                if self._closed:
                    return
                self._note(item)
                if (message := packer.add(item)) is not None:
                    yield message
        except Exception as exc:  # the caller's iterator raised: its error ends the results
            self._note(failed_input(count, exc))
        if (message := packer.flush()) is not None:
            yield message

    def take(self, outcomes: Iterable[broker_pb2.InlineOutcome]) -> list[tuple[Ready, OutputKind]]:
        """Records outcomes; returns the items now ready, in input order."""
        with self._lock:
            for outcome in outcomes:
                self._reorder.add(outcome)
                self._room.release()
            return self._reorder.pop_ready()

    def check_complete(self) -> None:
        """Raises if the call ended with items unanswered."""
        if self._reorder.pending:
            raise InternalError(
                grpc.StatusCode.INTERNAL,
                f"the broker ended map with {self._reorder.pending} tasks unanswered",
            )

    def close(self) -> None:
        """The call ended: wakes the request thread if it waits for room, so it ends too."""
        self._closed = True
        self._room.release()  # one thread takes room, and it checks closed after each take

    def _note(self, item: MapItem) -> None:
        with self._lock:
            self._reorder.sent(item)

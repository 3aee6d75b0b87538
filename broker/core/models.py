"""Users' models: upload, list, look up, delete, and what a task that names one needs.

Domain logic only (the ``Broker`` servicer converts messages around these calls). A model is a
file whose id is its sha256 (``gpubroker.protos.modelfile``); a tenant holds it through a row
(``gpubroker.broker.storage.models``), and tenants that upload the same bytes share the file
(``gpubroker.broker.storage.model_files``). Nothing a tenant does tells it whether another
tenant holds a model: another tenant's id is "no model", and its bytes must be sent in full.

Every record is kept in memory (there are few): the submit path checks a task's inputs against
its model, and the gateway describes the model in an assignment, without a database read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from gpubroker.broker.config import ModelLimits
from gpubroker.broker.core.settling import Settler
from gpubroker.broker.errors import (
    InvalidModelError,
    InvalidTaskError,
    LimitExceededError,
    ModelNotFoundError,
    ModelQuotaError,
    PayloadLostError,
)
from gpubroker.broker.model import GpuRequirement, ModelRecord, Task, TaskSpec
from gpubroker.broker.storage.async_store import AsyncTaskStore
from gpubroker.broker.storage.model_files import ModelFiles, ModelWriter
from gpubroker.protos import modelcheck, modelfile
from gpubroker.protos.wire import DTYPE_ITEMSIZE, TensorMeta

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_NAME_CHARS",
    "MAX_QUEUE_DELAY_S",
    "UPLOAD_IDLE_S",
    "ModelOptions",
    "ModelService",
    "check_inputs",
]

_T = TypeVar("_T")

MAX_BATCH_SIZE = 4096
"""Most rows an agent may stack into one call of a model (``ModelOptions.max_batch_size``)."""
MAX_QUEUE_DELAY_S = 10.0
"""Longest a task may wait at an agent for others to stack with it."""
MAX_NAME_CHARS = 256
"""Longest model name (the ``models.name`` column)."""
MAX_GPU_TYPE_CHARS = 64
"""Longest GPU type a requirement names (the ``requires_gpu_type`` columns)."""
UPLOAD_IDLE_S = 120.0
"""An upload that sends nothing for this long is refused (its reserved quota comes back)."""


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """What an upload's header says besides the id and size: how to list and run the model."""

    name: str = ""
    max_batch_size: int = 0
    """Most rows per call when batching; 0 or 1: off."""
    max_queue_delay_s: float = 0.0
    requires: GpuRequirement = field(default_factory=GpuRequirement)


class ModelService:
    """Tenants' models: their rows (cached), their files, and each tenant's quota."""

    def __init__(
        self,
        store: AsyncTaskStore,
        files: ModelFiles,
        limits: ModelLimits,
        check_room: Callable[[int, str], None] | None = None,
    ) -> None:
        self._store = store
        self._files = files
        self._check_room = check_room
        """Refuses (``SpoolFullError``) an upload that would fill the spool's disk."""
        self._limits = limits
        self._records: dict[tuple[str, str], ModelRecord] = {}
        self._reserved: defaultdict[str, int] = defaultdict(int)
        """Bytes of uploads in progress, per tenant: counted against the quota before they
        arrive, so that concurrent uploads cannot together pass it."""
        self._commit = asyncio.Lock()
        """Orders installing a file and its row against deleting the last row and the file."""
        self._settler = Settler()
        """Commits whose follow-up runs on although their call was cancelled (``_settle``)."""

    @property
    def limits(self) -> ModelLimits:
        """The quota and file limit uploads are checked against."""
        return self._limits

    async def start(self) -> None:
        """Loads every record and drops files that no row names (a crash's leftovers)."""
        self._files.open()
        records = await self._store.models()
        self._records = {(r.tenant, r.model_id): r for r in records}
        await asyncio.to_thread(self._files.sweep, {r.model_id for r in records})

    def get(self, tenant: str, model_id: str) -> ModelRecord:
        """One of the tenant's models; ``ModelNotFoundError`` for any other id."""
        if not modelfile.is_model_id(model_id):
            raise InvalidModelError(
                f"model id {model_id[:80]!r} is not 64 lowercase hex digits (a sha256)"
            )
        record = self._records.get((tenant, model_id))
        if record is None:
            raise ModelNotFoundError(model_id)
        return record

    def list(self, tenant: str) -> tuple[list[ModelRecord], int]:
        """The tenant's models, newest first, and their total size in bytes."""
        mine = [r for (owner, _), r in self._records.items() if owner == tenant]
        mine.sort(key=lambda r: (r.created_at, r.model_id), reverse=True)
        return mine, sum(r.size_bytes for r in mine)

    async def upload(
        self,
        tenant: str,
        model_id: str,
        size_bytes: int,
        options: ModelOptions,
        chunks: AsyncIterator[bytes | memoryview],
    ) -> tuple[ModelRecord, bool]:
        """Stores a model from its streamed bytes; returns it and whether the tenant held it.

        A model the tenant holds takes no bytes: the header alone updates its name and
        options. Otherwise the declared size must fit the tenant's quota before a byte is
        received, and the bytes must hash to ``model_id``, be a well-formed model file and
        pass ``gpubroker.protos.modelcheck``; anything else stores nothing.
        """
        if not modelfile.is_model_id(model_id):
            raise InvalidModelError(
                f"model id {model_id[:80]!r} is not 64 lowercase hex digits (a sha256)"
            )
        _check_options(options)
        if (held := self._records.get((tenant, model_id))) is not None:
            return await self._update(held, options, chunks), True
        self._check_size(tenant, size_bytes)
        self._reserved[tenant] += size_bytes
        try:
            return await self._receive(tenant, model_id, size_bytes, options, chunks)
        finally:
            self._reserved[tenant] -= size_bytes
            if not self._reserved[tenant]:
                del self._reserved[tenant]

    async def delete(self, tenant: str, model_id: str) -> ModelRecord:
        """Deletes one of the tenant's models unless queued or running tasks of the tenant
        name it (``ModelInUseError``); its file goes with the last row that names it."""
        self.get(tenant, model_id)
        return await self._settle(self._delete(tenant, model_id))

    async def _delete(self, tenant: str, model_id: str) -> ModelRecord:
        async with self._commit:
            # The store counts live tasks and deletes in one transaction, on the thread that
            # inserts tasks (which checks the row exists): a racing submit is either counted
            # or refused.
            record, unreferenced = await self._store.delete_model(tenant, model_id)
            self._records.pop((tenant, model_id), None)
            if unreferenced:
                await asyncio.to_thread(self._files.delete, model_id)
        return record

    async def _settle(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Runs ``work`` (a commit and the change to memory and files that must follow it) to
        its end even when the call that asked for it is cancelled: a peer hanging up between a
        row's commit and its record must not leave a row without its file or a record without
        its row. The caller still sees its own cancellation."""
        return await self._settler.settle(work)

    def resolve(self, tenant: str, spec: TaskSpec) -> TaskSpec:
        """A model task's spec, checked against its model and given the model's requirement
        unless it names its own; an operator task's spec as it is."""
        model_id = spec.model_id
        if model_id is None:
            return spec
        record = self.get(tenant, model_id)
        check_inputs(record, spec.inputs)
        if spec.requires:
            return spec
        return dataclasses.replace(spec, requires=record.requires)

    def record_for(self, task: Task) -> ModelRecord | None:
        """The model a task runs (None for an operator task, or a model since deleted)."""
        model_id = task.model_id
        return None if model_id is None else self._records.get((task.tenant, model_id))

    def file_chunks(self, task: Task, model_id: str) -> AsyncIterator[bytes]:
        """The bytes of ``model_id`` for an agent holding an attempt of ``task``, in ~1 MiB
        chunks; ``ModelNotFoundError`` unless the task runs that model."""
        if task.model_id != model_id or (record := self.record_for(task)) is None:
            raise ModelNotFoundError(model_id)
        path = self._files.path(model_id)
        size = path.stat().st_size if path.exists() else -1
        if size != record.size_bytes:
            raise PayloadLostError(
                f"the file of model {model_id} is lost ({max(size, 0)} of {record.size_bytes} "
                "bytes on disk)"
            )
        return self._files.chunks(model_id)

    def _check_size(self, tenant: str, size_bytes: int) -> None:
        limit = self._limits.max_file_bytes
        if size_bytes <= 0:
            raise InvalidModelError(f"size_bytes {size_bytes} must be positive")
        if size_bytes > limit:
            raise LimitExceededError(
                f"a model file of {size_bytes} bytes exceeds the limit of {limit} bytes"
            )
        used = self.list(tenant)[1] + self._reserved[tenant]
        quota = self._limits.quota_bytes
        if used + size_bytes > quota:
            raise ModelQuotaError(
                f"a model of {size_bytes} bytes does not fit your model quota: {used} of "
                f"{quota} bytes are used; delete a model first"
            )

    async def _update(
        self, held: ModelRecord, options: ModelOptions, chunks: AsyncIterator[bytes | memoryview]
    ) -> ModelRecord:
        _check_batching(options, held.metadata)
        async with asyncio.timeout(UPLOAD_IDLE_S):
            async for _ in chunks:
                raise InvalidModelError(
                    f"you hold model {held.model_id} already: send its header alone, no bytes"
                )
        record = dataclasses.replace(
            held,
            name=options.name or held.name,
            max_batch_size=options.max_batch_size,
            max_queue_delay_s=options.max_queue_delay_s,
            requires=options.requires,
        )
        return await self._settle(self._store_update(record))

    async def _store_update(self, record: ModelRecord) -> ModelRecord:
        async with self._commit:
            await self._store.update_model(record)
            self._records[(record.tenant, record.model_id)] = record
        return record

    async def _receive(
        self,
        tenant: str,
        model_id: str,
        size_bytes: int,
        options: ModelOptions,
        chunks: AsyncIterator[bytes | memoryview],
    ) -> tuple[ModelRecord, bool]:
        if self._check_room is not None:
            self._check_room(size_bytes, "a model upload")
        writer = self._files.writer(size_bytes)
        try:
            async for chunk in _idle_bounded(chunks, UPLOAD_IDLE_S):
                await writer.write(chunk)
            digest = await writer.commit()
            if digest != model_id:
                raise InvalidModelError(
                    f"model id mismatch: the header says {model_id}, the bytes hash to {digest}"
                )
            metadata = await asyncio.to_thread(_checked_file, writer, self._limits)
            _check_batching(options, metadata)
        except BaseException:
            writer.abort()
            raise
        # From here the install owns the writer: it runs to its end (and aborts the writer
        # itself) even if this call is cancelled meanwhile.
        install = self._install(tenant, model_id, size_bytes, options, metadata, writer)
        return await self._settle(install)

    async def _install(
        self,
        tenant: str,
        model_id: str,
        size_bytes: int,
        options: ModelOptions,
        metadata: dict[str, Any],
        writer: ModelWriter,
    ) -> tuple[ModelRecord, bool]:
        """Installs a checked upload's file and row, and its record once both are in place."""
        try:
            async with self._commit:
                if (held := self._records.get((tenant, model_id))) is not None:
                    return held, True  # a concurrent upload of the same model won
                record = ModelRecord(
                    tenant=tenant,
                    model_id=model_id,
                    name=options.name,
                    size_bytes=size_bytes,
                    metadata=metadata,
                    created_at=datetime.now(UTC),
                    max_batch_size=options.max_batch_size,
                    max_queue_delay_s=options.max_queue_delay_s,
                    requires=options.requires,
                )
                await asyncio.to_thread(self._files.install, writer, model_id)
                try:
                    await self._store.add_model(record)
                except BaseException:
                    if not any(m == model_id for _, m in self._records):
                        self._files.delete(model_id)
                    raise
                self._records[(tenant, model_id)] = record
            return record, False
        finally:
            writer.abort()  # a no-op once installed: the file was renamed away


async def _idle_bounded(
    chunks: AsyncIterator[bytes | memoryview], idle_s: float
) -> AsyncIterator[bytes | memoryview]:
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise InvalidModelError(f"the upload sent nothing for {idle_s:g} s") from None
        yield chunk


def _checked_file(writer: ModelWriter, limits: ModelLimits) -> dict[str, Any]:
    """The checks of a received file, on a worker thread: the container, then the graph
    policy, then the metadata's tensor specs. Returns the metadata."""
    refusal = None
    with writer.mapped() as buffer:
        # The refusal leaves as text: a live traceback would keep views of the map open.
        try:
            summary = modelfile.check(buffer, max_bytes=limits.max_file_bytes)
        except modelfile.ModelFileError as exc:
            refusal = str(exc)
    if refusal is not None:
        raise InvalidModelError(refusal)
    try:
        modelcheck.check_graph_json(summary.graph)
    except modelcheck.GraphRefusedError as exc:
        raise InvalidModelError(str(exc)) from None
    _check_metadata(summary.metadata)
    return summary.metadata


def _check_metadata(metadata: Mapping[str, Any]) -> None:
    """Refuses metadata whose specs a task could not be checked against."""
    for section in ("inputs", "outputs"):
        specs = metadata.get(section)
        if not isinstance(specs, list):
            raise InvalidModelError(f"the model's metadata has no list of {section}")
        for index, spec in enumerate(specs):
            dtype = spec.get("dtype") if isinstance(spec, dict) else None
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if dtype not in DTYPE_ITEMSIZE or not isinstance(shape, list):
                raise InvalidModelError(f"the model's metadata {section}[{index}] is {spec!r}")
            for position, dim in enumerate(shape):
                batch = dim is None and position == 0 and metadata.get("batch_dim_varies") is True
                if not batch and not (isinstance(dim, int) and not isinstance(dim, bool)):
                    raise InvalidModelError(f"the model's metadata {section}[{index}] is {spec!r}")
    max_batch = metadata.get("max_batch")
    if max_batch is not None and not (isinstance(max_batch, int) and max_batch >= 1):
        raise InvalidModelError(f"the model's metadata max_batch is {max_batch!r}")


def _check_options(options: ModelOptions) -> None:
    if len(options.name) > MAX_NAME_CHARS:
        raise InvalidModelError(f"a model name of {len(options.name)} characters is over 256")
    if not 0 <= options.max_batch_size <= MAX_BATCH_SIZE:
        raise InvalidModelError(
            f"max_batch_size {options.max_batch_size} is outside 0..{MAX_BATCH_SIZE}"
        )
    delay = options.max_queue_delay_s
    if not (math.isfinite(delay) and 0 <= delay <= MAX_QUEUE_DELAY_S):
        raise InvalidModelError(
            f"max_queue_delay_seconds {delay} is outside 0..{MAX_QUEUE_DELAY_S:g}"
        )
    requires = options.requires
    if len(requires.gpu_type or "") > MAX_GPU_TYPE_CHARS or requires.min_memory_bytes < 0:
        raise InvalidModelError(f"the model's GPU requirement {requires} is not valid")


def _check_batching(options: ModelOptions, metadata: Mapping[str, Any]) -> None:
    if options.max_batch_size <= 1:
        return
    if metadata.get("batch_dim_varies") is not True:
        raise InvalidModelError(
            f"max_batch_size {options.max_batch_size} needs a model whose batch dimension "
            "varies; this one was exported with fixed shapes (use 0 or 1)"
        )
    max_batch = metadata.get("max_batch")
    if isinstance(max_batch, int) and options.max_batch_size > max_batch:
        raise InvalidModelError(
            f"max_batch_size {options.max_batch_size} exceeds the model's max_batch {max_batch}"
        )


def check_inputs(record: ModelRecord, inputs: Sequence[TensorMeta]) -> None:
    """Refuses inputs that do not match the model's input specs, naming the input and what
    was expected: the count, each dtype and shape; a varying batch dimension must be the same
    for every input and within ``1..max_batch``."""
    specs = record.metadata.get("inputs")
    assert isinstance(specs, list)  # checked at upload
    if len(inputs) != len(specs):
        raise InvalidTaskError(
            f"model {record.model_id} takes {len(specs)} inputs, the task gives {len(inputs)}"
        )
    batch: int | None = None
    for index, (meta, spec) in enumerate(zip(inputs, specs, strict=True)):
        expected = spec["shape"]
        if meta.dtype != spec["dtype"] or len(meta.shape) != len(expected):
            raise InvalidTaskError(_mismatch(index, meta, spec))
        for position, (got, want) in enumerate(zip(meta.shape, expected, strict=True)):
            if want is None and position == 0:
                batch = got if batch is None else batch
                if got != batch:
                    raise InvalidTaskError(
                        f"input {index} has batch size {got}, input 0 has {batch}: a batch "
                        "dimension must be the same for every input"
                    )
            elif got != want:
                raise InvalidTaskError(_mismatch(index, meta, spec))
    max_batch = record.metadata.get("max_batch")
    upper = max_batch if isinstance(max_batch, int) else None
    if batch is not None and (batch < 1 or (upper is not None and batch > upper)):
        raise InvalidTaskError(
            f"batch size {batch} is outside 1..{upper if upper is not None else 'any'} "
            f"for model {record.model_id}"
        )


def _mismatch(index: int, meta: TensorMeta, spec: Mapping[str, Any]) -> str:
    shape = ", ".join("batch" if d is None else str(d) for d in spec["shape"])
    return (
        f"input {index} is {meta.dtype} {list(meta.shape)}; the model expects "
        f"{spec['dtype']} [{shape}]"
    )

"""Users' models on this agent: fetched once, kept on disk, kept loaded on the device.

A model file is fetched from the broker the first time a task needs it, into a temporary file
in the cache folder, its sha256 checked while it streams and its length against the
assignment's ``ModelRef``; only then is it renamed to its id, so a file named by an id always
holds those bytes. Files stay on disk under a byte limit, least recently used first out, and
the folder is rescanned at start (a file whose name is not its own sha256 is deleted). Loaded
models stay on the device under a second byte limit (the file size is the estimate), at least
one of them. Attempts that need the same model at once share one fetch and one load.

Loading costs the tenant nothing: the fetch, the checks, the load and one warm-up call (zeros
shaped by the metadata's input specs) are timed together and reported apart from compute.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import torch

from gpubroker.gpu_agent.errors import AgentError, ModelUnusableError
from gpubroker.gpu_agent.model import ModelRef
from gpubroker.gpu_agent.model_loader import LoadedModel, ModelRejectedError, load_model
from gpubroker.gpu_agent.runner import Runner
from gpubroker.protos.modelfile import is_model_id

__all__ = ["CHUNK_TIMEOUT_S", "Acquired", "FetchModel", "ModelCache", "warm_up_inputs"]

logger = logging.getLogger(__name__)

FetchModel = Callable[[], AsyncIterator[bytes]]
"""Streams a model file's bytes from the broker, in order."""

CHUNK_TIMEOUT_S = 60.0
"""Longest wait for the next chunk of a model file before the fetch fails."""
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class Acquired:
    """A model ready on the device, and how long the caller waited to get it."""

    model: LoadedModel
    load_seconds: float
    """Fetch, check, load and warm-up time this caller waited for; 0 when resident."""


class ModelCache:
    """Model files on disk and loaded models on the device, each under an LRU byte limit."""

    def __init__(self, directory: Path, disk_bytes: int, device_bytes: int, runner: Runner) -> None:
        self.directory = directory
        self.disk_bytes = disk_bytes
        self.device_bytes = device_bytes
        self.fetches = 0
        """Model files fetched from the broker since start (a file held is never fetched)."""
        self.loads = 0
        """Models loaded onto the device since start."""
        self.hits = 0
        """Acquisitions that found their model loaded on the device."""
        self.misses = 0
        """Acquisitions that had to wait for a load (and perhaps a fetch)."""
        self._runner = runner
        self._disk: OrderedDict[str, int] = OrderedDict()  # id -> bytes, least recent first
        self._resident: OrderedDict[str, LoadedModel] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._recency: OrderedDict[str, None] = OrderedDict()
        self._flights: dict[str, asyncio.Task[tuple[LoadedModel, float]]] = {}

    def scan(self) -> None:
        """Creates the folder, keeps the files named by their own sha256, deletes the rest.

        Blocking (it hashes every file): call it before taking work, off the event loop.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for path in self.directory.iterdir():
            if not path.is_file():
                continue
            if is_model_id(path.name) and _sha256_of(path) == path.name:
                stat = path.stat()
                found.append((stat.st_mtime, path.name, stat.st_size))
            else:
                logger.warning("deleting %s from the model cache: not a verified model file", path)
                path.unlink(missing_ok=True)
        for _, model_id, size in sorted(found):
            self._disk[model_id] = size
            self._sizes[model_id] = size
            self._recency[model_id] = None
        self._evict_disk()

    def on_disk(self) -> list[str]:
        """Ids of the model files held on disk, most recently used first."""
        return [m for m in reversed(self._recency) if m in self._disk]

    def held(self) -> list[str]:
        """Ids of the models held on disk or on the device, most recently used first."""
        return [m for m in reversed(self._recency) if m in self._disk or m in self._resident]

    @property
    def disk_used_bytes(self) -> int:
        """Bytes of the model files on disk."""
        return sum(self._disk.values())

    @property
    def device_used_bytes(self) -> int:
        """Bytes (by file size) of the models loaded on the device."""
        return self._resident_bytes()

    def resident(self) -> list[str]:
        """Ids of the models loaded on the device, most recently used first."""
        return list(reversed(self._resident))

    async def acquire(self, ref: ModelRef, fetch: FetchModel) -> Acquired:
        """The model ``ref`` names, loaded; fetched and loaded first unless resident.

        Raises:
            ModelUnusableError: the file had the wrong size or hash, or its graph was refused.
            grpc.aio.AioRpcError: the broker refused the fetch or is gone.
        """
        model_id = ref.model_id
        self._touch(model_id)
        model = self._resident.get(model_id)
        if model is not None:
            self.hits += 1
            self._resident.move_to_end(model_id)
            return Acquired(model, 0.0)
        self.misses += 1
        for tries_left in (1, 0):
            flight = self._flights.get(model_id)
            mine = flight is None
            if flight is None:
                flight = self._start(ref, fetch)
            try:
                # One waiter giving up (a revoked attempt) must not cancel the others' load.
                return Acquired(*await asyncio.shield(flight))
            except grpc.aio.AioRpcError as exc:
                if mine or not tries_left:
                    raise
                # Another attempt's fetch was refused (that attempt was revoked, say): this
                # attempt may still fetch the model for itself.
                logger.info("a shared fetch of model %s failed (%s): again", model_id, exc.code())
        raise AssertionError("unreachable")

    def _start(self, ref: ModelRef, fetch: FetchModel) -> asyncio.Task[tuple[LoadedModel, float]]:
        model_id = ref.model_id
        flight = asyncio.create_task(self._load(ref, fetch), name=f"load-{model_id[:12]}")
        self._flights[model_id] = flight
        flight.add_done_callback(lambda done: self._landed(model_id, done))
        return flight

    async def close(self) -> None:
        """Cancels the loads still in progress and waits for them."""
        flights = list(self._flights.values())
        for flight in flights:
            flight.cancel()
        if flights:
            await asyncio.wait(flights)

    # -- loading --------------------------------------------------------------------------------

    def _landed(self, model_id: str, flight: asyncio.Task[Any]) -> None:
        self._flights.pop(model_id, None)
        if not flight.cancelled() and flight.exception() is not None:
            self._forget_if_gone(model_id)

    async def _load(self, ref: ModelRef, fetch: FetchModel) -> tuple[LoadedModel, float]:
        started = time.perf_counter()
        model_id = ref.model_id
        if model_id not in self._disk:
            await self._fetch(ref, fetch)
        path = self.directory / model_id
        try:
            model = await self._runner.offload(_load_file, path, model_id, self._runner)
        except ModelRejectedError as exc:
            self._drop_file(model_id)
            raise ModelUnusableError(f"model {model_id} was refused: {exc}") from None
        self.loads += 1
        await self._warm_up(model)
        seconds = time.perf_counter() - started
        self._resident[model_id] = model
        self._evict_device()
        logger.info("model %s loaded and warmed up in %.3f s", model_id, seconds)
        return model, seconds

    async def _warm_up(self, model: LoadedModel) -> None:
        try:
            await self._runner.warm_up_model(model, warm_up_inputs(model.metadata))
        except (AgentError, ValueError) as exc:
            # Zeros are not every model's valid input (an index of 0 into nothing, say).
            logger.warning("warm-up call of model %s failed: %s", model.model_id, exc)

    async def _fetch(self, ref: ModelRef, fetch: FetchModel) -> None:
        model_id, size = ref.model_id, ref.size_bytes
        self.fetches += 1
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".fetch-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as file:
                digest = await _stream_to(file, fetch(), model_id, size)
            if digest != model_id:
                raise ModelUnusableError(
                    f"model {model_id}: the fetched file's sha256 is {digest}, not its id"
                )
            os.replace(temporary, self.directory / model_id)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        logger.info("fetched model %s (%d bytes)", model_id, size)
        self._disk[model_id] = size
        self._sizes[model_id] = size
        self._evict_disk()

    # -- bookkeeping ----------------------------------------------------------------------------

    def _touch(self, model_id: str) -> None:
        self._recency[model_id] = None
        self._recency.move_to_end(model_id)
        if model_id in self._disk:
            self._disk.move_to_end(model_id)

    def _holds(self, model_id: str) -> bool:
        return model_id in self._disk or model_id in self._resident

    def _evict_disk(self) -> None:
        while sum(self._disk.values()) > self.disk_bytes and len(self._disk) > 1:
            victim = next((m for m in self._disk if m not in self._flights), None)
            if victim is None or victim == next(reversed(self._disk)):
                return  # only files being loaded, or the newest one, are left
            logger.info("evicting model file %s from disk", victim)
            self._drop_file(victim)

    def _evict_device(self) -> None:
        while len(self._resident) > 1 and self._resident_bytes() > self.device_bytes:
            victim, _ = self._resident.popitem(last=False)
            logger.info("unloading model %s from the device", victim)
            self._forget_if_gone(victim)

    def _resident_bytes(self) -> int:
        return sum(self._sizes.get(m, 0) for m in self._resident)

    def _drop_file(self, model_id: str) -> None:
        self._disk.pop(model_id, None)
        (self.directory / model_id).unlink(missing_ok=True)
        self._forget_if_gone(model_id)

    def _forget_if_gone(self, model_id: str) -> None:
        if not self._holds(model_id):
            self._recency.pop(model_id, None)


def warm_up_inputs(metadata: dict[str, Any]) -> list[torch.Tensor]:
    """Zeros shaped by a model's input specs; a varying (``null``) dimension gets size 1."""
    inputs = []
    for spec in metadata.get("inputs", []):
        dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"model input dtype {spec['dtype']!r} is not a torch dtype")
        shape = [1 if size is None else int(size) for size in spec["shape"]]
        inputs.append(torch.zeros(shape, dtype=dtype))
    return inputs


async def _stream_to(
    file: IO[bytes], chunks: AsyncIterator[bytes], model_id: str, size: int
) -> str:
    hasher = hashlib.sha256()
    received = 0
    stream = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(CHUNK_TIMEOUT_S):  # a stalled broker fails the fetch
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        received += len(chunk)
        if received > size:
            raise ModelUnusableError(
                f"model {model_id}: the broker sent more than its {size} bytes"
            )
        await asyncio.to_thread(_write, file, hasher, chunk)
    if received != size:
        raise ModelUnusableError(f"model {model_id}: got {received} of its {size} bytes")
    return hasher.hexdigest()


def _write(file: IO[bytes], hasher: Any, chunk: bytes) -> None:
    hasher.update(chunk)
    file.write(chunk)


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def _load_file(path: Path, model_id: str, runner: Runner) -> LoadedModel:
    data = path.read_bytes()
    return load_model(data, expected_id=model_id, max_bytes=len(data), device=runner.device.device)

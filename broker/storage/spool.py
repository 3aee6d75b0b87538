"""Task payloads: inputs before a submit is acknowledged, outputs per attempt.

Small payloads (at most ``INLINE_MAX_BYTES``) stay in memory and are stored in the task's row,
in the same transaction as the task: no file, no extra fsync. Larger ones are files written
under a ``.part`` name by a writer thread, fsynced, then renamed (and the directory fsynced),
so a crash never leaves a half-written payload under its final name.

A call-bound task's payloads (``Task.call_bound``: made by ``Run``) need not survive the broker
process: the task does not outlive its call, and a broker that restarts cancels it. Its inputs
stay in memory, as the views into the received messages, while ``memory_bytes`` allows (the
page-cache copy of a spool write was the broker's largest cost on a large tensor); past that,
and for its outputs (which ``GetResult`` may still fetch after the call), it gets files that
are written like the others but not fsynced, since the disk flush would only make the caller
wait (~15 % of a 64 MiB round trip).

The spool keeps its filesystem from filling: a payload that would become a file is refused
(``SpoolFullError``) before a byte is written when the free space, less the payload, would fall
below ``DiskFloor``. Its directory carries a marker file with a random id (``Spool.identity``)
that the database records (``gpubroker.broker.storage.retention``), so a broker started with
another directory can say so instead of reporting its payloads lost.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gpubroker.broker.errors import PayloadLostError, SpoolFullError
from gpubroker.broker.model import Task
from gpubroker.protos.wire import DEFAULT_CHUNK_BYTES, INLINE_MAX_BYTES

__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "INLINE_MAX_BYTES",
    "MARKER_NAME",
    "DiskFloor",
    "InlineWriter",
    "MemoryWriter",
    "PayloadFile",
    "Spool",
    "SpoolWriter",
    "fsync_dir",
    "read_chunks",
]

DEFAULT_MEMORY_BYTES = 512 << 20
"""Call-bound inputs held in memory at once, by default (``Settings.spool_memory_bytes``)."""

MARKER_NAME = "spool-id"
"""The file in the spool's root that holds its id."""

_PART = ".part"


@dataclass(frozen=True, slots=True)
class DiskFloor:
    """Free space the spool's filesystem keeps: uploads that would go below it are refused."""

    min_free_bytes: int = 1 << 30
    """Bytes that stay free (``GPUBROKER_SPOOL_MIN_FREE_MB``)."""
    min_free_percent: float = 1.0
    """Percent of the filesystem that stays free (``GPUBROKER_SPOOL_MIN_FREE_PERCENT``)."""

    def __post_init__(self) -> None:
        if self.min_free_bytes < 0 or not 0 <= self.min_free_percent <= 100:
            raise ValueError(
                f"spool min_free_bytes {self.min_free_bytes} must be >= 0 and "
                f"min_free_percent {self.min_free_percent} within 0..100"
            )

    def floor(self, total_bytes: int) -> int:
        """The bytes to keep free on a filesystem of ``total_bytes``."""
        return max(self.min_free_bytes, int(total_bytes * self.min_free_percent / 100))


@dataclass(frozen=True, slots=True)
class PayloadFile:
    """One file in the spool's ``in/`` or ``out/`` directory."""

    path: Path
    task_id: str
    """The task it belongs to ("" for a name the spool never writes)."""
    attempt: int | None
    """The attempt of an output file; None for inputs."""
    size: int
    mtime: float
    """Last modification, seconds since the epoch (a file being written keeps it fresh)."""

    @property
    def is_partial(self) -> bool:
        """A ``.part`` file: written now, or left by a crash."""
        return self.path.name.endswith(_PART)


class InlineWriter:
    """Collects a small payload in memory; the task store persists ``inline``."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.inline: bytes | None = None

    def write(self, data: bytes | memoryview) -> None:
        """Appends bytes."""
        self._buffer += data

    async def commit(self) -> None:
        """Freezes the bytes; they become durable with the task's row."""
        self.inline = bytes(self._buffer)

    def abort(self) -> None:
        """Drops the bytes."""
        self._buffer.clear()


class MemoryWriter:
    """Keeps a call-bound task's inputs in memory; ``commit`` hands them to the spool."""

    inline: bytes | None = None
    """Always None: the payload is held by the spool, not the task's row."""

    def __init__(self, spool: Spool, task_id: str, nbytes: int) -> None:
        self._spool = spool
        self._task_id = task_id
        self._nbytes = nbytes
        self._parts: list[memoryview] = []

    def write(self, data: bytes | memoryview) -> None:
        """Keeps a view of ``data``, which must not change afterwards (received bytes don't)."""
        self._parts.append(memoryview(data))

    async def commit(self) -> None:
        """The inputs are complete: the spool serves them from now on."""
        self._spool._hold(self._task_id, self._parts, self._nbytes)

    def abort(self) -> None:
        """Drops the bytes and gives their room back."""
        self._parts = []
        self._spool._free(self._nbytes)


class SpoolWriter:
    """Appends chunks to one payload file; ``commit`` makes it durable under its final name.

    The file is written by a thread of its own, so the event loop goes on receiving the next
    chunk while the last one is copied into the page cache (on this kind of VM that copy, not
    the network, was half of the broker's time on a large tensor). At most ``MAX_PENDING``
    chunks wait for the thread; past that, ``write`` blocks: the disk pushes back.
    """

    MAX_PENDING = 16

    inline: bytes | None = None
    """Always None: the payload is the file."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        """fsync the file and its directory on commit."""
        self._part = path.with_name(path.name + _PART)
        self._file: BinaryIO = open(self._part, "wb", buffering=0)  # noqa: SIM115
        self.bytes_written = 0
        self._pending: queue.Queue[memoryview | None] = queue.Queue(self.MAX_PENDING)
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._drain, name="spool-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes | memoryview) -> None:
        """Queues bytes for the file (``data`` must not change afterwards: bytes are ideal)."""
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        self._pending.put(view)
        self.bytes_written += len(view)

    async def commit(self) -> None:
        """Waits for the writes, fsyncs the file, renames it into place, fsyncs the directory
        (without the fsyncs when not ``durable``)."""
        await asyncio.to_thread(self._finish_and_rename)

    def abort(self) -> None:
        """Drops the partial file."""
        self._stop()
        self._file.close()
        self._part.unlink(missing_ok=True)

    def _drain(self) -> None:
        while (view := self._pending.get()) is not None:
            if self._error is not None:
                continue  # keep taking chunks so a blocked write() wakes up
            try:
                while view:
                    written = self._file.write(view)
                    assert written is not None
                    view = view[written:]
            except OSError as exc:
                self._error = exc

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()

    def _finish_and_rename(self) -> None:
        self._stop()
        if self._error is not None:
            self._file.close()
            raise self._error
        if self.durable:
            os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._part, self.path)
        if self.durable:
            fsync_dir(self.path.parent)


class Spool:
    """Where payload files live: ``in/<task>.bin`` and ``out/<task>.<attempt>.bin``."""

    def __init__(
        self,
        root: Path,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        disk_floor: DiskFloor | None = None,
    ) -> None:
        self.root = root
        self._inputs = root / "in"
        self._outputs = root / "out"
        self.memory_bytes = memory_bytes
        """Room for call-bound inputs held in memory."""
        self.disk_floor = disk_floor or DiskFloor(0, 0.0)
        """Free space kept on the spool's filesystem (none by default: tests, tools)."""
        self.held_bytes = 0
        """Bytes of inputs held in memory now, reserved from the moment a writer starts."""
        self.identity = ""
        """The id in the directory's marker file (set by ``open``)."""
        self.marker_was_new = False
        """Whether ``open`` wrote the marker: the directory had none (new, or from before
        markers)."""
        self._held: dict[str, tuple[list[memoryview], int]] = {}

    def open(self) -> None:
        """Creates the directories, reads (or writes) the marker and drops partial files left
        by a crash."""
        for folder in (self._inputs, self._outputs):
            folder.mkdir(parents=True, exist_ok=True)
            for part in folder.glob(f"*{_PART}"):
                part.unlink(missing_ok=True)
        self.identity, self.marker_was_new = _read_or_write_marker(self.root / MARKER_NAME)

    def check_room(self, nbytes: int, what: str) -> None:
        """Raises ``SpoolFullError`` when writing ``nbytes`` would leave the filesystem below
        its floor; ``what`` names the upload in the message."""
        usage = shutil.disk_usage(self.root)
        floor = self.disk_floor.floor(usage.total)
        if usage.free - nbytes < floor:
            raise SpoolFullError(
                f"{what} of {nbytes} bytes refused: the broker's spool disk ({self.root}) has "
                f"{usage.free} bytes free and keeps at least {floor} free "
                "(--spool-min-free-mb, GPUBROKER_SPOOL_MIN_FREE_MB / _PERCENT); try again later"
            )

    def free_bytes(self) -> int:
        """Free bytes on the spool's filesystem now."""
        return shutil.disk_usage(self.root).free

    def files(self) -> Iterator[PayloadFile]:
        """Every file in ``in/`` and ``out/`` now (one may vanish while this runs)."""
        for folder, is_output in ((self._inputs, False), (self._outputs, True)):
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if entry.is_file(follow_symlinks=False):
                        yield _payload_file(Path(entry.path), is_output, stat)

    def input_path(self, task_id: str) -> Path:
        """Where a task's inputs live."""
        return self._inputs / f"{task_id}.bin"

    def output_path(self, task_id: str, attempt: int) -> Path:
        """Where one attempt's outputs live."""
        return self._outputs / f"{task_id}.{attempt}.bin"

    def write_inputs(
        self, task_id: str, nbytes: int, *, call_bound: bool = False
    ) -> InlineWriter | MemoryWriter | SpoolWriter:
        """Starts writing a task's ``nbytes`` of inputs: in its row when small, in memory when
        call-bound and there is room, else a file (fsynced unless call-bound)."""
        if nbytes <= INLINE_MAX_BYTES:
            return InlineWriter()
        if call_bound and self.held_bytes + nbytes <= self.memory_bytes:
            self.held_bytes += nbytes
            return MemoryWriter(self, task_id, nbytes)
        self.check_room(nbytes, "an upload of task inputs")
        return SpoolWriter(self.input_path(task_id), durable=not call_bound)

    def write_outputs(
        self, task_id: str, attempt: int, nbytes: int, *, durable: bool = True
    ) -> InlineWriter | SpoolWriter:
        """Starts writing an attempt's ``nbytes`` of outputs (in memory when small)."""
        if nbytes <= INLINE_MAX_BYTES:
            return InlineWriter()
        self.check_room(nbytes, "a result upload")
        return SpoolWriter(self.output_path(task_id, attempt), durable=durable)

    def inputs(self, task: Task) -> AsyncIterator[bytes | memoryview]:
        """Streams a task's input bytes, from its row, from memory or from its file."""
        if task.inline_inputs is not None:
            return _from_memory(task.inline_inputs)
        if (held := self._held.get(task.id)) is not None:
            return _from_parts(held[0])
        return read_chunks(self.input_path(task.id))

    def outputs(self, task: Task) -> AsyncIterator[bytes]:
        """Streams a succeeded task's output bytes, from its row or its file.

        Raises:
            PayloadLostError: the file is gone or short (an unflushed call-bound result after
                an OS crash).
        """
        if task.inline_outputs is not None:
            return _from_memory(task.inline_outputs)
        path = self.output_path(task.id, task.attempt)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = -1
        if size != task.output_bytes:
            cause = (
                "results of run/map are not flushed to disk: the broker's machine crashed, or "
                "the file was deleted"
                if task.call_bound
                else "the file was deleted or its disk lost it"
            )
            raise PayloadLostError(
                f"the result of task {task.id} is lost ({max(size, 0)} of {task.output_bytes} "
                f"bytes in spool directory {self.root}): {cause}; run the task again"
            )
        return read_chunks(path)

    def delete_inputs(self, task_id: str) -> None:
        """Drops a finished task's inputs, held in memory or in a file."""
        if (held := self._held.pop(task_id, None)) is not None:
            self._free(held[1])
        else:
            self.input_path(task_id).unlink(missing_ok=True)

    def _hold(self, task_id: str, parts: list[memoryview], nbytes: int) -> None:
        """Serves ``parts`` as the task's inputs (their room was reserved by ``write_inputs``)."""
        self._held[task_id] = (parts, nbytes)

    def _free(self, nbytes: int) -> None:
        """Gives back room reserved by ``write_inputs``."""
        self.held_bytes -= nbytes

    def release_inputs(self, task: Task) -> None:
        """Drops a finished task's inputs, held in memory or in a file; a task whose inputs
        live in its row has neither."""
        if task.inline_inputs is None:
            self.delete_inputs(task.id)

    def delete_outputs(self, task_id: str, attempt: int) -> None:
        """Removes an attempt's outputs."""
        self.output_path(task_id, attempt).unlink(missing_ok=True)


async def read_chunks(path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> AsyncIterator[bytes]:
    """Yields a payload file's bytes in chunks (nothing for an empty payload)."""
    with open(path, "rb", buffering=0) as file:
        while chunk := file.read(chunk_bytes):
            yield chunk
            # Let other calls run between chunks of a large payload.
            await asyncio.sleep(0)


async def _from_memory(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


async def _from_parts(parts: list[memoryview]) -> AsyncIterator[memoryview]:
    for part in parts:
        yield part
        await asyncio.sleep(0)  # as read_chunks: let other calls run between chunks


def _payload_file(path: Path, is_output: bool, stat: os.stat_result) -> PayloadFile:
    """Parses ``<task>.bin`` (inputs) or ``<task>.<attempt>.bin`` (outputs), ``.part`` too."""
    name = path.name.removesuffix(_PART)
    stem, dot, suffix = name.rpartition(".")
    task_id, attempt = "", None
    if dot and suffix == "bin":
        if not is_output:
            task_id = stem
        else:
            head, _, number = stem.rpartition(".")
            if head and number.isdigit():
                task_id, attempt = head, int(number)
    return PayloadFile(path, task_id, attempt, stat.st_size, stat.st_mtime)


def _read_or_write_marker(path: Path) -> tuple[str, bool]:
    """The id in the marker file, written (and fsynced) first when there is none."""
    try:
        identity = path.read_text().strip()
    except FileNotFoundError:
        identity = ""
    if identity:
        return identity, False
    identity = uuid.uuid4().hex
    part = path.with_name(path.name + _PART)
    with open(part, "w") as file:
        file.write(identity + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(part, path)
    fsync_dir(path.parent)
    return identity, True


def fsync_dir(path: Path) -> None:
    """Flushes a directory's entries (a file just renamed into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

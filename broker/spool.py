"""Task payloads on local disk: inputs before a submit is acknowledged, outputs per attempt.

A file is written under a ``.part`` name, fsynced, then renamed (and the directory fsynced),
so a crash never leaves a half-written payload under its final name. Writes of a chunk to the
page cache are treated as non-blocking; the fsync crosses into a worker thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from client.wire import DEFAULT_CHUNK_BYTES

__all__ = ["Spool", "SpoolWriter", "read_chunks"]


class SpoolWriter:
    """Appends chunks to one payload file; ``commit`` makes it durable under its final name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._part = path.with_name(path.name + ".part")
        self._file: BinaryIO = open(self._part, "wb", buffering=0)  # noqa: SIM115
        self.bytes_written = 0

    def write(self, data: bytes | memoryview) -> None:
        """Appends bytes."""
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            assert written is not None
            view = view[written:]
            self.bytes_written += written

    async def commit(self) -> None:
        """Fsyncs the file, renames it into place and fsyncs the directory."""
        await asyncio.to_thread(self._sync_and_rename)

    def abort(self) -> None:
        """Drops the partial file."""
        self._file.close()
        self._part.unlink(missing_ok=True)

    def _sync_and_rename(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._part, self.path)
        _fsync_dir(self.path.parent)


class Spool:
    """Where payload files live: ``in/<task>.bin`` and ``out/<task>.<attempt>.bin``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._inputs = root / "in"
        self._outputs = root / "out"

    def open(self) -> None:
        """Creates the directories and drops partial files left by a crash."""
        for folder in (self._inputs, self._outputs):
            folder.mkdir(parents=True, exist_ok=True)
            for part in folder.glob("*.part"):
                part.unlink(missing_ok=True)

    def input_path(self, task_id: str) -> Path:
        """Where a task's inputs live."""
        return self._inputs / f"{task_id}.bin"

    def output_path(self, task_id: str, attempt: int) -> Path:
        """Where one attempt's outputs live."""
        return self._outputs / f"{task_id}.{attempt}.bin"

    def write_inputs(self, task_id: str) -> SpoolWriter:
        """Starts writing a task's inputs."""
        return SpoolWriter(self.input_path(task_id))

    def write_outputs(self, task_id: str, attempt: int) -> SpoolWriter:
        """Starts writing an attempt's outputs."""
        return SpoolWriter(self.output_path(task_id, attempt))

    def delete_inputs(self, task_id: str) -> None:
        """Removes a finished task's inputs."""
        self.input_path(task_id).unlink(missing_ok=True)

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

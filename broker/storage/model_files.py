"""Model files on disk: one file per model id, shared by every tenant that uploaded it.

``<root>/<model_id>.model`` holds the bytes whose sha256 is ``model_id``. An upload is written
to ``<root>/incoming/`` while it arrives (hashed as it goes, never past its declared size),
fsynced, checked by the caller, and only then renamed into place and the directory fsynced:
a crash never leaves a partial file under a model's name. Files whose last row is gone are
deleted by the caller (``ModelService``), and ``open`` drops what a crash left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from gpubroker.broker.errors import InvalidModelError
from gpubroker.broker.storage.spool import fsync_dir, read_chunks

__all__ = ["ModelFiles", "ModelWriter"]

_SUFFIX = ".model"


class ModelWriter:
    """Receives one upload's bytes into a temporary file, hashing them on a worker thread."""

    def __init__(self, path: Path, declared_bytes: int) -> None:
        self.path = path
        self.declared_bytes = declared_bytes
        self.bytes_written = 0
        self._hash = hashlib.sha256()
        self._file: BinaryIO | None = open(path, "wb", buffering=0)  # noqa: SIM115

    async def write(self, data: bytes | memoryview) -> None:
        """Appends ``data``; refuses bytes past the declared size before writing any of them."""
        if self.bytes_written + len(data) > self.declared_bytes:
            raise InvalidModelError(
                f"the upload sent more than the {self.declared_bytes} bytes its header "
                "declared (a declared size that lies)"
            )
        self.bytes_written += len(data)
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        self._hash.update(data)
        self._file.write(data)

    async def commit(self) -> str:
        """Checks every declared byte came, fsyncs the file; returns the sha256 of its bytes."""
        if self.bytes_written != self.declared_bytes:
            raise InvalidModelError(
                f"the upload ended after {self.bytes_written} of the {self.declared_bytes} bytes "
                "its header declared (a declared size that lies)"
            )
        await asyncio.to_thread(self._sync)
        return self._hash.hexdigest()

    def _sync(self) -> None:
        assert self._file is not None
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    @contextlib.contextmanager
    def mapped(self) -> Iterator[mmap.mmap]:
        """The committed file, memory-mapped read-only (its bytes are never all in RAM)."""
        with (
            open(self.path, "rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m,
        ):
            yield m

    def abort(self) -> None:
        """Drops the temporary file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)


class ModelFiles:
    """The directory of model files, named by their ids."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._incoming = root / "incoming"

    def open(self) -> None:
        """Creates the directories and drops uploads a crash interrupted."""
        self._incoming.mkdir(parents=True, exist_ok=True)
        for part in self._incoming.iterdir():
            part.unlink(missing_ok=True)

    def path(self, model_id: str) -> Path:
        """Where the file of ``model_id`` lives."""
        return self.root / f"{model_id}{_SUFFIX}"

    def writer(self, declared_bytes: int) -> ModelWriter:
        """Starts receiving an upload of ``declared_bytes``."""
        return ModelWriter(self._incoming / f"{uuid.uuid4().hex}.part", declared_bytes)

    def install(self, writer: ModelWriter, model_id: str) -> None:
        """Renames a committed, checked upload into place (blocking: two syscalls and a
        directory fsync). The same bytes already there are replaced by themselves."""
        os.replace(writer.path, self.path(model_id))
        fsync_dir(self.root)

    def delete(self, model_id: str) -> None:
        """Removes the file of ``model_id`` (once no row names it)."""
        self.path(model_id).unlink(missing_ok=True)

    def sweep(self, keep: Iterable[str]) -> list[str]:
        """Deletes every model file whose id is not in ``keep`` (a crash between installing a
        file and writing its row leaves one); returns the ids deleted."""
        wanted = set(keep)
        dropped = []
        for path in self.root.glob(f"*{_SUFFIX}"):
            if path.stem not in wanted:
                path.unlink(missing_ok=True)
                dropped.append(path.stem)
        return dropped

    def chunks(self, model_id: str) -> AsyncIterator[bytes]:
        """Streams the file of ``model_id`` in ~1 MiB chunks."""
        return read_chunks(self.path(model_id))

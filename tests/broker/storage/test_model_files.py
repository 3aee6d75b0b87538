"""Model files on disk: bounded, hashed uploads; atomic installs; leftovers swept."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gpubroker.broker.errors import InvalidModelError
from gpubroker.broker.storage.model_files import ModelFiles


@pytest.fixture
def files(tmp_path: Path) -> ModelFiles:
    files = ModelFiles(tmp_path / "models")
    files.open()
    return files


async def test_an_upload_is_hashed_as_it_arrives_and_installed_under_its_id(
    files: ModelFiles,
) -> None:
    data = b"model bytes" * 1000
    writer = files.writer(len(data))

    await writer.write(data[:5000])
    await writer.write(data[5000:])
    digest = await writer.commit()
    files.install(writer, digest)

    assert digest == hashlib.sha256(data).hexdigest()
    assert files.path(digest).read_bytes() == data
    assert list((files.root / "incoming").iterdir()) == []
    assert b"".join([c async for c in files.chunks(digest)]) == data


async def test_bytes_past_the_declared_size_are_refused_before_they_are_written(
    files: ModelFiles,
) -> None:
    writer = files.writer(4)

    with pytest.raises(InvalidModelError, match="more than the 4 bytes"):
        await writer.write(b"12345")

    assert writer.path.stat().st_size == 0
    writer.abort()
    assert not writer.path.exists()


async def test_an_upload_that_ends_short_is_refused(files: ModelFiles) -> None:
    writer = files.writer(10)
    await writer.write(b"12345")

    with pytest.raises(InvalidModelError, match="after 5 of the 10 bytes"):
        await writer.commit()

    writer.abort()


def test_opening_drops_interrupted_uploads_and_sweep_drops_unnamed_files(
    files: ModelFiles,
) -> None:
    (files.root / "incoming" / "x.part").write_bytes(b"half")
    files.path("a" * 64).write_bytes(b"kept")
    files.path("b" * 64).write_bytes(b"orphan")

    files.open()
    dropped = files.sweep({"a" * 64})

    assert dropped == ["b" * 64]
    assert list((files.root / "incoming").iterdir()) == []
    assert sorted(p.name for p in files.root.glob("*.model")) == [f"{'a' * 64}.model"]

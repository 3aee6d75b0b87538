"""The payload spool: files appear whole under their final names, fsynced unless the task is
call-bound, whose inputs stay in memory while there is room."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gpubroker.broker.model import Task, TaskState
from gpubroker.broker.storage.spool import (
    INLINE_MAX_BYTES,
    InlineWriter,
    MemoryWriter,
    Spool,
    SpoolWriter,
)

BIG = INLINE_MAX_BYTES + 1


def _task(task_id: str) -> Task:
    return Task(
        id=task_id, tenant="t", workload="echo", params={}, priority=0,
        state=TaskState.SUCCEEDED, attempt=1, inputs=(), outputs=(), input_bytes=BIG,
        output_bytes=0, created_at=datetime.now(UTC), call_bound=True,
    )  # fmt: skip


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.open()
    return spool


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


async def test_a_durable_payload_is_fsynced_with_its_directory(
    spool: Spool, fsyncs: list[int]
) -> None:
    writer = spool.write_inputs("t1", BIG)
    assert isinstance(writer, SpoolWriter) and writer.durable
    writer.write(b"a" * BIG)

    await writer.commit()

    assert spool.input_path("t1").read_bytes() == b"a" * BIG
    assert len(fsyncs) == 2  # the file, then the directory that names it


async def test_call_bound_inputs_stay_in_memory_while_there_is_room(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    spool = Spool(tmp_path / "spool", memory_bytes=2 * BIG)
    spool.open()
    fsyncs.clear()  # the new directory's marker file
    held = [spool.write_inputs(f"t{i}", BIG, call_bound=True) for i in range(3)]
    assert [type(w) for w in held] == [MemoryWriter, MemoryWriter, SpoolWriter]
    assert spool.held_bytes == 2 * BIG
    for i, writer in enumerate(held):
        writer.write(bytes([i]) * 10)
        writer.write(bytes([i]) * (BIG - 10))
        await writer.commit()

    for i in range(3):
        task = _task(f"t{i}")
        assert b"".join([bytes(c) async for c in spool.inputs(task)]) == bytes([i]) * BIG
    assert not spool.input_path("t0").exists() and spool.input_path("t2").exists()
    assert fsyncs == []  # the file of a call-bound task is not fsynced either

    spool.release_inputs(_task("t0"))
    spool.delete_inputs("t2")
    assert spool.held_bytes == BIG and not spool.input_path("t2").exists()
    spool.delete_inputs("t1")
    assert spool.held_bytes == 0


async def test_an_aborted_upload_gives_its_room_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", memory_bytes=BIG)
    writer = spool.write_inputs("t1", BIG, call_bound=True)
    writer.write(b"x" * 100)

    writer.abort()

    assert spool.held_bytes == 0
    assert isinstance(spool.write_inputs("t2", BIG, call_bound=True), MemoryWriter)


async def test_call_bound_outputs_are_files_written_whole_without_fsync(
    spool: Spool, fsyncs: list[int]
) -> None:
    writer = spool.write_outputs("t1", 1, BIG, durable=False)
    writer.write(b"b" * BIG)
    await writer.commit()

    assert spool.output_path("t1", 1).read_bytes() == b"b" * BIG
    assert fsyncs == []
    assert not list(spool.root.rglob("*.part"))


async def test_an_aborted_payload_leaves_no_file(spool: Spool) -> None:
    writer = spool.write_outputs("t1", 2, BIG)
    writer.write(b"c" * 10)

    writer.abort()

    assert not list(spool.root.rglob("*.bin*"))


def test_small_payloads_stay_in_memory(spool: Spool) -> None:
    assert isinstance(spool.write_inputs("t1", INLINE_MAX_BYTES, call_bound=True), InlineWriter)
    assert isinstance(spool.write_outputs("t1", 1, INLINE_MAX_BYTES, durable=False), InlineWriter)

"""The payload spool: files appear whole under their final names, fsynced unless call-bound."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.spool import INLINE_MAX_BYTES, InlineWriter, Spool, SpoolWriter

BIG = INLINE_MAX_BYTES + 1


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


async def test_a_call_bound_payload_is_written_whole_without_fsync(
    spool: Spool, fsyncs: list[int]
) -> None:
    inputs = spool.write_inputs("t1", BIG, durable=False)
    outputs = spool.write_outputs("t1", 1, BIG, durable=False)
    for writer in (inputs, outputs):
        writer.write(b"b" * BIG)
        await writer.commit()

    assert spool.input_path("t1").read_bytes() == b"b" * BIG
    assert spool.output_path("t1", 1).read_bytes() == b"b" * BIG
    assert fsyncs == []
    assert not list(spool.root.rglob("*.part"))


async def test_an_aborted_payload_leaves_no_file(spool: Spool) -> None:
    writer = spool.write_outputs("t1", 2, BIG)
    writer.write(b"c" * 10)

    writer.abort()

    assert not list(spool.root.rglob("*.bin*"))


def test_small_payloads_stay_in_memory(spool: Spool) -> None:
    assert isinstance(spool.write_inputs("t1", INLINE_MAX_BYTES), InlineWriter)
    assert isinstance(spool.write_outputs("t1", 1, INLINE_MAX_BYTES, durable=False), InlineWriter)

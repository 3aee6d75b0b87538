"""The spool's disk guard and marker: uploads that would fill the disk are refused before a
byte is written, and the directory keeps the id it was given."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gpubroker.broker.errors import LimitExceededError, SpoolFullError
from gpubroker.broker.storage.spool import (
    INLINE_MAX_BYTES,
    MARKER_NAME,
    DiskFloor,
    InlineWriter,
    MemoryWriter,
    Spool,
)

BIG = INLINE_MAX_BYTES + 1


@pytest.fixture
def full_spool(tmp_path: Path) -> Spool:
    """A spool whose floor is above the free space of its filesystem (it is "full")."""
    free = shutil.disk_usage(tmp_path).free
    spool = Spool(tmp_path / "spool", disk_floor=DiskFloor(min_free_bytes=free + (1 << 30)))
    spool.open()
    return spool


def test_inputs_that_would_be_a_file_are_refused_before_a_byte_is_written(
    full_spool: Spool,
) -> None:
    with pytest.raises(SpoolFullError) as refused:
        full_spool.write_inputs("t1", BIG)

    assert isinstance(refused.value, LimitExceededError)  # RESOURCE_EXHAUSTED at the edge
    assert "keeps at least" in str(refused.value) and "bytes free" in str(refused.value)
    assert list(full_spool.files()) == []


def test_result_uploads_that_would_be_a_file_are_refused(full_spool: Spool) -> None:
    with pytest.raises(SpoolFullError, match="a result upload"):
        full_spool.write_outputs("t1", 1, BIG)

    assert list(full_spool.files()) == []


def test_payloads_that_need_no_file_are_still_taken_when_the_disk_is_full(
    full_spool: Spool,
) -> None:
    assert isinstance(full_spool.write_inputs("t1", 16), InlineWriter)
    assert isinstance(full_spool.write_outputs("t1", 1, 16), InlineWriter)
    assert isinstance(full_spool.write_inputs("t2", BIG, call_bound=True), MemoryWriter)


def test_a_percent_floor_counts_against_the_filesystems_size() -> None:
    floor = DiskFloor(min_free_bytes=10, min_free_percent=5.0)

    assert floor.floor(1000) == 50
    assert floor.floor(100) == 10
    with pytest.raises(ValueError):
        DiskFloor(min_free_percent=101)


def test_the_spool_keeps_its_marker_id_across_opens(tmp_path: Path) -> None:
    first = Spool(tmp_path / "spool")
    first.open()
    again = Spool(tmp_path / "spool")
    again.open()

    assert first.marker_was_new and not again.marker_was_new
    assert first.identity == again.identity != ""
    assert (tmp_path / "spool" / MARKER_NAME).read_text().strip() == first.identity

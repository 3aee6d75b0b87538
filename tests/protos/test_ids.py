"""Task and request ids are UUIDv7: 32 hex digits that sort by creation time."""

from __future__ import annotations

import uuid

from gpubroker.protos.ids import time_ordered_id


def test_an_id_is_a_version_7_uuid_in_32_hex_digits() -> None:
    value = time_ordered_id()

    assert len(value) == 32 and value == value.lower()
    parsed = uuid.UUID(hex=value)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_the_first_48_bits_are_the_unix_milliseconds() -> None:
    now_ns = 1_764_000_000_123_456_789

    assert int(time_ordered_id(now_ns)[:12], 16) == 1_764_000_000_123


def test_ids_sort_by_their_millisecond_and_do_not_repeat() -> None:
    earlier = [time_ordered_id(10_000_000 * i) for i in range(1, 200)]
    later = [time_ordered_id(10_000_000 * i + 1_000_000) for i in range(1, 200)]

    assert all(a < b for a, b in zip(earlier, later, strict=True))
    assert sorted(earlier) == earlier
    assert len({time_ordered_id(5_000_000) for _ in range(100_000)}) == 100_000

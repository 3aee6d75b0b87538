"""Chunking for tests that build raw request streams: whole ``bytes`` per chunk.

The wire layer hands out views (``iter_views``, no copy); a test that puts chunks into
protobuf messages or compares them wants plain bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from gpubroker.protos.wire import DEFAULT_CHUNK_BYTES, iter_views


def iter_chunks(
    buffers: Iterable[bytes | bytearray | memoryview], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """Cuts the concatenation of ``buffers`` into ``bytes`` chunks of at most ``chunk_bytes``."""
    for views in iter_views(buffers, chunk_bytes):
        yield b"".join(views)

"""The wire format's values and limits, without protobuf, numpy or torch: tensor dtypes, headers,
checksums and chunking, workload parameters and the largest ``ListTasks`` page.

A tensor travels as a header (``TensorMeta``: dtype, shape, nbytes, CRC-32C) and then its raw
C-order little-endian bytes, split into chunks of about 1 MiB that may span tensor boundaries.
The broker uses this module to check and relay bytes without ever decoding a tensor; the client
and the agent use it to cut and reassemble buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import crc32c as _crc32c

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DTYPE_ITEMSIZE",
    "INLINE_MAX_BYTES",
    "MAX_PAGE_SIZE",
    "MAX_RANK",
    "Assembler",
    "Buffer",
    "ChecksumMismatchError",
    "Param",
    "PayloadTooLargeError",
    "TensorMeta",
    "TensorStream",
    "WireError",
    "crc32c",
    "iter_views",
]

DEFAULT_CHUNK_BYTES = 1 << 20
"""Chunk size: large enough to amortise Python's per-message cost, far below the 4 MiB cap."""

INLINE_MAX_BYTES = 64 << 10
"""Payloads up to this size ride inside control messages (task rows, assignments, results,
``RunMany`` batches) instead of being chunked onto a stream or a spool file of their own."""

MAX_RANK = 32
"""Most dimensions a tensor may have (torch's own limit is 64; nothing real needs more)."""

MAX_PAGE_SIZE = 1000
"""The largest ``ListTasks`` page the broker serves; clients ask for no more."""

Param = int | float | str | bool
"""A scalar workload parameter: the values a ``ParamValue`` message carries."""

DTYPE_ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}
"""Bytes per element of every dtype the wire carries."""


class WireError(ValueError):
    """A tensor header or byte stream is malformed."""


class ChecksumMismatchError(WireError):
    """A tensor's bytes do not match the checksum in its header."""


class PayloadTooLargeError(WireError):
    """A tensor or task is larger than the receiver accepts."""


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """Returns the CRC-32C of ``data``, continuing from ``value``."""
    return int(_crc32c.crc32c(data, value))


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Describes one tensor on the wire; its bytes travel separately."""

    dtype: str
    """Wire dtype name, a key of ``DTYPE_ITEMSIZE``."""
    shape: tuple[int, ...]
    """Dimensions; ``()`` for a 0-d tensor."""
    nbytes: int
    """Length of the raw bytes."""
    crc32c: int
    """CRC-32C of the raw bytes."""
    name: str = ""
    """Optional name, echoed back."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def validate(self, max_bytes: int | None = None) -> None:
        """Raises ``WireError`` unless the header is self-consistent and within ``max_bytes``."""
        label = f"tensor {self.name!r}" if self.name else "tensor"
        if self.dtype not in DTYPE_ITEMSIZE:
            known = ", ".join(sorted(DTYPE_ITEMSIZE))
            raise WireError(f"{label}: unknown dtype {self.dtype!r}; known dtypes: {known}")
        if len(self.shape) > MAX_RANK:
            raise WireError(f"{label}: rank {len(self.shape)} exceeds the maximum of {MAX_RANK}")
        if any(d < 0 for d in self.shape):
            raise WireError(f"{label}: negative dimension in shape {list(self.shape)}")
        expected = self.numel * DTYPE_ITEMSIZE[self.dtype]
        if self.nbytes != expected:
            raise WireError(
                f"{label}: nbytes is {self.nbytes} but shape {list(self.shape)} of "
                f"{self.dtype} needs {expected} bytes"
            )
        if not 0 <= self.crc32c < 1 << 32:
            raise WireError(f"{label}: crc32c {self.crc32c} is not a 32-bit value")
        if max_bytes is not None and self.nbytes > max_bytes:
            raise PayloadTooLargeError(
                f"{label} of {self.nbytes} bytes exceeds the limit of {max_bytes} bytes"
            )


def iter_views(
    buffers: Iterable[bytes | bytearray | memoryview], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[list[memoryview]]:
    """Cuts the concatenation of ``buffers`` into chunks of at most ``chunk_bytes``, as lists
    of views into the buffers (no copy).

    Small tensors share a chunk, so a task of tiny inputs costs one message, not one each.
    """
    pending: list[memoryview] = []
    pending_bytes = 0
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        offset = 0
        while offset < len(view):
            take = min(chunk_bytes - pending_bytes, len(view) - offset)
            pending.append(view[offset : offset + take])
            pending_bytes += take
            offset += take
            if pending_bytes == chunk_bytes:
                yield pending
                pending, pending_bytes = [], 0
    if pending_bytes:
        yield pending


class TensorStream:
    """Splits a byte stream into the tensors its headers declare, checking sizes and checksums.

    ``feed`` yields ``(tensor_index, offset, piece)`` for each piece of each chunk; ``finish``
    raises unless every declared byte arrived. Checksums are verified as each tensor completes.
    """

    def __init__(self, metas: Sequence[TensorMeta]) -> None:
        self._metas = tuple(metas)
        self._index = 0
        self._offset = 0
        self._crc = 0
        self.received_bytes = 0
        self._skip_empty()

    @property
    def expected_bytes(self) -> int:
        """Total bytes the headers declare."""
        return sum(m.nbytes for m in self._metas)

    def feed(self, data: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
        """Consumes one chunk; yields the pieces it holds, tensor by tensor."""
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self._index >= len(self._metas):
                raise WireError(
                    f"received more bytes than the {self.expected_bytes} the headers declare"
                )
            meta = self._metas[self._index]
            take = min(meta.nbytes - self._offset, len(view) - pos)
            piece = view[pos : pos + take]
            self._crc = crc32c(piece, self._crc)
            yield self._index, self._offset, piece
            self._offset += take
            self.received_bytes += take
            pos += take
            if self._offset == meta.nbytes:
                self._complete(meta)

    def finish(self) -> None:
        """Raises ``WireError`` if the stream ended before every declared byte arrived."""
        if self._index < len(self._metas):
            raise WireError(
                f"stream ended after {self.received_bytes} of {self.expected_bytes} declared bytes"
            )

    def _complete(self, meta: TensorMeta) -> None:
        if self._crc != meta.crc32c:
            label = f"tensor {meta.name!r}" if meta.name else f"tensor #{self._index}"
            raise ChecksumMismatchError(
                f"{label}: crc32c of the received bytes is {self._crc:#010x}, "
                f"header says {meta.crc32c:#010x}"
            )
        self._index += 1
        self._offset = 0
        self._crc = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._metas) and self._metas[self._index].nbytes == 0:
            self._complete(self._metas[self._index])


Buffer = bytearray | memoryview
"""A writable byte buffer a tensor is reassembled into."""


class Assembler:
    """Reassembles chunks into one pre-allocated buffer per tensor (one copy per byte).

    ``allocate`` makes a tensor's buffer: ``bytearray`` by default; the client and the agent
    pass ``gpubroker.client.codec.empty_buffer``, which does not zero-fill a large one first (that
    pass over fresh memory cost as much as receiving the bytes).
    """

    def __init__(
        self, metas: Sequence[TensorMeta], allocate: Callable[[int], Buffer] = bytearray
    ) -> None:
        self.metas = tuple(metas)
        self.buffers = [allocate(m.nbytes) for m in self.metas]
        self._stream = TensorStream(self.metas)

    def feed(self, data: bytes | memoryview) -> None:
        """Copies one chunk's bytes into place."""
        for index, offset, piece in self._stream.feed(data):
            self.buffers[index][offset : offset + len(piece)] = piece

    def finish(self) -> list[Buffer]:
        """Returns the buffers once every byte arrived and checked out."""
        self._stream.finish()
        return self.buffers

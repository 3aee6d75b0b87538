"""The wire format: header validation, chunking and checked reassembly, without a server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpubroker.client.codec import decode, empty_buffer, encode
from gpubroker.protos.wire import (
    Assembler,
    ChecksumMismatchError,
    PayloadTooLargeError,
    TensorMeta,
    TensorStream,
    WireError,
    crc32c,
    iter_views,
)
from tests.support.chunks import iter_chunks


def test_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def test_crc32c_continues_across_pieces() -> None:
    assert crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (TensorMeta("float32", (2, 3), 24, 0), None),
        (TensorMeta("float31", (2,), 8, 0), "unknown dtype"),
        (TensorMeta("float32", (2, 3), 23, 0), "needs 24 bytes"),
        (TensorMeta("float32", (-1,), 4, 0), "negative"),
        (TensorMeta("uint8", (1,) * 33, 1, 0), "rank 33"),
        (TensorMeta("uint8", (4,), 4, 1 << 32), "32-bit"),
    ],
)
def test_header_validation_names_the_problem(meta: TensorMeta, message: str | None) -> None:
    if message is None:
        meta.validate()
        return
    with pytest.raises(WireError, match=message):
        meta.validate()


def test_a_tensor_over_the_limit_is_too_large() -> None:
    with pytest.raises(PayloadTooLargeError, match="exceeds the limit of 16 bytes"):
        TensorMeta("float32", (5,), 20, 0).validate(max_bytes=16)


def test_small_tensors_share_one_chunk_of_views_into_them() -> None:
    buffers = [b"ab", b"", b"cde", b"f"]

    chunks = list(iter_views(buffers, chunk_bytes=4))

    assert [[bytes(v) for v in views] for views in chunks] == [[b"ab", b"cd"], [b"e", b"f"]]
    assert chunks[0][0].obj is buffers[0]  # a view, not a copy


def test_chunks_reassemble_into_the_same_tensors() -> None:
    tensors = [torch.randn(100), torch.arange(7, dtype=torch.int16), torch.empty(0)]
    encoded = [encode(t) for t in tensors]
    assembler = Assembler([m for m, _ in encoded])

    for chunk in iter_chunks([d for _, d in encoded], chunk_bytes=33):
        assembler.feed(chunk)
    buffers = assembler.finish()

    for (meta, _), buffer, tensor in zip(encoded, buffers, tensors, strict=True):
        assert torch.equal(decode(meta, buffer), tensor)  # type: ignore[arg-type]


def test_large_tensors_reassemble_into_buffers_that_were_never_zero_filled() -> None:
    big = torch.randn(300_000)  # 1.2 MB: past the inline size, so not a bytearray
    tensors = [big, torch.arange(5, dtype=torch.int64), torch.empty(0)]
    encoded = [encode(t) for t in tensors]
    assembler = Assembler([m for m, _ in encoded], empty_buffer)

    for chunk in iter_chunks([d for _, d in encoded], chunk_bytes=65_536):
        assembler.feed(chunk)
    buffers = assembler.finish()
    as_numpy = decode(encoded[0][0], buffers[0], "numpy")

    assert isinstance(buffers[0], memoryview) and isinstance(buffers[1], bytearray)
    for (meta, _), buffer, tensor in zip(encoded, buffers, tensors, strict=True):
        assert torch.equal(decode(meta, buffer), tensor)  # type: ignore[arg-type]
    assert isinstance(as_numpy, np.ndarray) and as_numpy.flags.writeable  # the caller's own


def test_a_flipped_byte_fails_the_checksum() -> None:
    meta, data = encode(torch.arange(10))
    corrupt = bytearray(data)
    corrupt[3] ^= 1

    with pytest.raises(ChecksumMismatchError):
        list(TensorStream([meta]).feed(bytes(corrupt)))


def test_missing_and_extra_bytes_are_errors() -> None:
    meta, data = encode(torch.arange(10))
    short = TensorStream([meta])
    list(short.feed(bytes(data[:-1])))

    with pytest.raises(WireError, match="ended after 79 of 80"):
        short.finish()
    with pytest.raises(WireError, match="more bytes"):
        list(TensorStream([meta]).feed(bytes(data) + b"x"))


def test_numpy_big_endian_arrays_are_sent_little_endian() -> None:
    array = np.arange(5, dtype=">i4")

    meta, data = encode(array)

    assert meta.dtype == "int32"
    assert bytes(data) == np.arange(5, dtype="<i4").tobytes()


def test_unsupported_dtypes_are_refused_at_the_call_site() -> None:
    with pytest.raises(WireError, match="cannot be sent"):
        encode(np.array(["text"]))
    with pytest.raises(TypeError):
        encode([1, 2, 3])  # type: ignore[arg-type]

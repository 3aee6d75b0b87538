"""The chunk fast path (protos.frames) is byte-for-byte protobuf, and falls back to it.

Unit properties against the real protobuf classes; tests/e2e/test_plain_protobuf.py drives a
broker process with plain generated stubs.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import given
from hypothesis import strategies as st

from gpubroker.protos import agent_pb2, broker_pb2, frames, task_pb2
from tests.support.chunks import iter_chunks

CHUNKED = (
    broker_pb2.SubmitRequest,
    broker_pb2.RunRequest,
    broker_pb2.RunResponse,
    broker_pb2.GetResultResponse,
    agent_pb2.FetchInputsResponse,
    agent_pb2.PutResultRequest,
)

# Sizes around every varint boundary of the two length fields, and a real chunk.
EDGE_SIZES = [0, 1, 2, 124, 125, 126, 127, 128, 16_380, 16_383, 16_384, 1 << 20]


@pytest.mark.parametrize("cls", CHUNKED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("size", EDGE_SIZES)
def test_a_chunk_message_is_exactly_what_protobuf_serialises(cls: type[Message], size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))

    raw = frames.chunk_message(cls, data)

    reference = cls()
    reference.chunk.data = data  # type: ignore[attr-defined]
    assert raw == reference.SerializeToString()
    assert cls.FromString(raw).chunk.data == data  # type: ignore[attr-defined]
    view = frames.read_chunk(raw, frames.chunk_field(cls) or 0)
    assert view is not None and view.tobytes() == data


def test_the_chunk_field_is_found_from_the_descriptor() -> None:
    assert frames.chunk_field(broker_pb2.RunRequest) == 2
    assert frames.chunk_field(agent_pb2.FetchInputsResponse) == 1
    assert frames.chunk_field(broker_pb2.GetTaskRequest) is None
    with pytest.raises(ValueError, match="no DataChunk field"):
        frames.chunk_message(broker_pb2.GetTaskRequest, b"x")


@given(st.binary(max_size=3000))
def test_any_data_round_trips_without_a_copy(data: bytes) -> None:
    raw = frames.chunk_message(broker_pb2.RunRequest, data)

    view = frames.read_chunk(raw, 2)

    assert view is not None and view.tobytes() == data
    assert view.obj is raw  # a view into the received message, not a copy


@given(
    st.lists(st.binary(max_size=300), max_size=6),
    st.integers(min_value=1, max_value=500),
)
def test_chunk_messages_carry_the_same_bytes_as_iter_chunks(
    buffers: list[bytes], chunk_bytes: int
) -> None:
    framed = list(frames.chunk_messages(broker_pb2.RunRequest, buffers, chunk_bytes))

    parsed = [broker_pb2.RunRequest.FromString(m).chunk.data for m in framed]
    assert parsed == list(iter_chunks(buffers, chunk_bytes))


def _other_encodings() -> list[tuple[str, bytes]]:
    chunk = broker_pb2.RunRequest(chunk=task_pb2.DataChunk(data=b"abc")).SerializeToString()
    unknown_inner = b"\x12\x07" + b"\x0a\x03abc" + b"\x18\x01"  # DataChunk with field 3 = 1
    return [
        (
            "header",
            broker_pb2.RunRequest(
                header=broker_pb2.TaskHeader(workload="echo")
            ).SerializeToString(),
        ),
        ("unknown field after the chunk", chunk + b"\x18\x05"),
        ("unknown field inside the chunk", unknown_inner),
        ("data given twice (the last wins)", b"\x12\x0a" + b"\x0a\x03abc" + b"\x0a\x03xyz"),
        ("chunk given twice (merged)", chunk + chunk),
        ("non-minimal varint length", b"\x12\x85\x00" + b"\x0a\x03abc"),
        ("empty message", b""),
    ]


@pytest.mark.parametrize(
    ("label", "raw"), _other_encodings(), ids=[c[0] for c in _other_encodings()]
)
def test_other_encodings_get_exactly_protobufs_reading(label: str, raw: bytes) -> None:
    parse = frames.deserializer(broker_pb2.RunRequest)

    got = parse(raw)

    expected = broker_pb2.RunRequest.FromString(raw)
    if isinstance(got, memoryview):  # only the fast path's own form, read the same way
        assert expected.WhichOneof("kind") == "chunk" and got.tobytes() == expected.chunk.data
    else:
        assert got == expected


@pytest.mark.parametrize(
    "raw", [b"\x12", b"\x12\x05\x0a\x03ab", b"\x12\x80", b"\xff" * 12, b"\x12\x03\x0a\x05abc"]
)
def test_truncated_or_garbage_bytes_fail_as_protobuf_fails(raw: bytes) -> None:
    assert frames.read_chunk(raw, 2) is None
    with pytest.raises(DecodeError):
        frames.deserializer(broker_pb2.RunRequest)(raw)


def test_the_serializer_passes_built_messages_through() -> None:
    serialize = frames.serializer(broker_pb2.RunResponse)
    message = broker_pb2.RunResponse(task=task_pb2.TaskInfo(task_id="t"))

    assert serialize(b"\x12\x00") == b"\x12\x00"
    assert serialize(message) == message.SerializeToString()


def test_chunk_data_reads_both_forms_the_deserializer_returns() -> None:
    parse = frames.deserializer(agent_pb2.FetchInputsResponse)
    canonical = frames.chunk_message(agent_pb2.FetchInputsResponse, b"abc")
    # Another valid encoding of the same chunk: an unknown field first takes protobuf's path.
    other = b"\xf8\x07\x01" + canonical

    fast, parsed = parse(canonical), parse(other)

    assert isinstance(fast, memoryview) and isinstance(parsed, agent_pb2.FetchInputsResponse)
    assert bytes(frames.chunk_data(fast)) == bytes(frames.chunk_data(parsed)) == b"abc"

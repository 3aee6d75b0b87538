"""Chunk messages on the wire without protobuf: the fast path for tensor bytes.

Every header-then-chunks stream (``Submit``, ``Run``, ``GetResult``, ``FetchInputs``,
``PutResult``) carries its bytes as a ``DataChunk`` in one field of the stream's message. Built
through protobuf, such a message costs a copy into the message, a serialisation copy and, on
the VMs we measured, page faults on every fresh ~1 MiB arena block: 1.5-2.9 ms per MiB, more
than all the rest of the relay. Here a chunk message is one ``b"".join`` of a few header bytes
and the data (~25 us per MiB), and an incoming one is read as a ``memoryview`` into the bytes
gRPC received, without a copy.

The bytes are exactly what protobuf itself would produce, so any reader (grpcurl, another
language's stubs) sees ordinary messages, and incoming messages in any other encoding (other
field order, unknown fields, repeated fields...) are parsed by protobuf as before: only the
canonical form takes the fast path.

``serializer``/``deserializer`` plug this into gRPC method handlers and stubs: outgoing,
``bytes`` are taken as an already-built message; incoming, a chunk message arrives as a
``memoryview`` of its data and any other message as the protobuf class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from gpubroker.protos import task_pb2
from gpubroker.protos.wire import DEFAULT_CHUNK_BYTES, iter_views

__all__ = [
    "chunk_data",
    "chunk_field",
    "chunk_message",
    "chunk_messages",
    "deserializer",
    "method_options",
    "read_chunk",
    "serializer",
]

_LEN = 2  # protobuf wire type of length-delimited fields
_DATA_TAG = (task_pb2.DataChunk.DESCRIPTOR.fields_by_name["data"].number << 3) | _LEN


M = TypeVar("M", bound=Message)

_FIELDS: dict[type[Message], int | None] = {}


def chunk_field(cls: type[Message]) -> int | None:
    """The number of the ``DataChunk`` field of messages of ``cls``, or None if it has none."""
    if cls not in _FIELDS:
        descriptor: Descriptor = cls.DESCRIPTOR  # type: ignore[assignment]
        numbers = [
            f.number
            for f in descriptor.fields
            if f.type == FieldDescriptor.TYPE_MESSAGE
            and f.message_type is task_pb2.DataChunk.DESCRIPTOR
        ]
        if len(numbers) > 1:
            raise ValueError(f"{cls.__name__} has more than one DataChunk field")
        _FIELDS[cls] = numbers[0] if numbers else None
    return _FIELDS[cls]


def _required_field(cls: type[Message]) -> int:
    field = chunk_field(cls)
    if field is None:
        raise ValueError(f"{cls.__name__} has no DataChunk field")
    return field


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _prefix(field: int, size: int) -> bytes:
    """The bytes before ``size`` bytes of data in a chunk message on ``field``."""
    if size == 0:  # proto3 leaves an empty bytes field out: an empty DataChunk
        return _varint((field << 3) | _LEN) + b"\x00"
    inner = _varint(_DATA_TAG) + _varint(size)
    return _varint((field << 3) | _LEN) + _varint(len(inner) + size) + inner


def chunk_message(cls: type[Message], data: bytes | bytearray | memoryview) -> bytes:
    """The serialised message of ``cls`` whose ``DataChunk`` field holds ``data``.

    One copy of ``data``; byte for byte what protobuf's ``SerializeToString`` returns.
    """
    field = _required_field(cls)
    view = memoryview(data).cast("B")
    return b"".join((_prefix(field, len(view)), view))


def chunk_messages(
    cls: type[Message],
    buffers: Iterable[bytes | bytearray | memoryview],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """The concatenation of ``buffers`` as chunk messages of at most ``chunk_bytes`` each.

    Each message is built with one copy of its bytes (header and pieces joined at once).
    """
    field = _required_field(cls)
    for views in iter_views(buffers, chunk_bytes):
        yield b"".join((_prefix(field, sum(len(v) for v in views)), *views))


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """Decodes a varint at ``pos``; returns (value, next position), or (-1, 0) if malformed."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(raw))):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return -1, 0


def read_chunk(raw: bytes, field: int) -> memoryview | None:
    """The data of a chunk message in canonical form on ``field``, without a copy; else None.

    None means "not this fast path" (a header, another encoding, or garbage): the caller
    parses ``raw`` with protobuf, which accepts or refuses it exactly as before.
    """
    tag, pos = _read_varint(raw, 0)
    if tag != (field << 3) | _LEN:
        return None
    size, pos = _read_varint(raw, pos)
    if pos + size != len(raw):
        return None
    if size == 0:
        return memoryview(raw)[pos:]
    tag, pos = _read_varint(raw, pos)
    if tag != _DATA_TAG:
        return None
    size, pos = _read_varint(raw, pos)
    if pos + size != len(raw):
        return None
    return memoryview(raw)[pos:]


def serializer(cls: type[M]) -> Callable[[M | bytes], bytes]:
    """Serialises messages of ``cls``, taking ``bytes`` as already serialised (a chunk)."""

    def serialize(message: M | bytes) -> bytes:
        return message if isinstance(message, bytes) else message.SerializeToString()

    return serialize


def deserializer(cls: type[M]) -> Callable[[bytes], M | memoryview]:
    """Parses messages of ``cls``; a chunk message comes back as a ``memoryview`` of its data.

    For a class with no ``DataChunk`` field this is plain ``cls.FromString``.
    """
    parse: Callable[[bytes], M] = cls.FromString
    field = chunk_field(cls)
    if field is None:
        return parse
    number = field

    def deserialize(raw: bytes) -> M | memoryview:
        data = read_chunk(raw, number)
        return parse(raw) if data is None else data

    return deserialize


def chunk_data(message: Any) -> bytes | memoryview:
    """The data of a chunk message that came through ``deserializer``: the ``memoryview`` it
    arrived as, or, for one protobuf parsed, its ``DataChunk``'s bytes."""
    if isinstance(message, memoryview):
        return message
    data: bytes = message.chunk.data
    return data


def method_options(
    method: MethodDescriptor,
) -> tuple[str, Callable[[Any], bytes], Callable[[bytes], Any]]:
    """The arguments of a channel's ``stream_stream`` (etc.) for ``method`` with this module's
    (de)serializers: ``channel.stream_stream(*method_options(m))`` is a stub method with the
    chunk fast path."""
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    return path, serializer(request), deserializer(response)

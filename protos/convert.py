"""Conversions between wire-format values and their protobuf messages.

Shared by the client, the broker and the agent, so a tensor header, a parameter, a task state
or a timestamp is encoded the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from gpubroker.protos import task_pb2
from gpubroker.protos.states import TaskState
from gpubroker.protos.wire import Param, TensorMeta

__all__ = [
    "meta_from_proto",
    "meta_to_proto",
    "params_from_proto",
    "params_to_proto",
    "state_from_proto",
    "state_to_proto",
    "time_from_proto",
    "time_to_proto",
]

_STATE_TO_PROTO: dict[TaskState, task_pb2.TaskState.ValueType] = {
    TaskState.QUEUED: task_pb2.TASK_STATE_QUEUED,
    TaskState.RUNNING: task_pb2.TASK_STATE_RUNNING,
    TaskState.SUCCEEDED: task_pb2.TASK_STATE_SUCCEEDED,
    TaskState.FAILED: task_pb2.TASK_STATE_FAILED,
    TaskState.CANCELLED: task_pb2.TASK_STATE_CANCELLED,
}
_STATE_FROM_PROTO: dict[int, TaskState] = {v: k for k, v in _STATE_TO_PROTO.items()}


def meta_to_proto(meta: TensorMeta) -> task_pb2.TensorHeader:
    """A tensor header message."""
    return task_pb2.TensorHeader(
        name=meta.name, dtype=meta.dtype, shape=meta.shape, nbytes=meta.nbytes, crc32c=meta.crc32c
    )


def meta_from_proto(msg: task_pb2.TensorHeader) -> TensorMeta:
    """A tensor header (not yet validated: call ``validate``)."""
    return TensorMeta(
        dtype=msg.dtype, shape=tuple(msg.shape), nbytes=msg.nbytes, crc32c=msg.crc32c, name=msg.name
    )


def params_to_proto(params: Mapping[str, Any]) -> dict[str, task_pb2.ParamValue]:
    """Parameter messages; only int, float, str and bool values are allowed."""
    result = {}
    for name, value in params.items():
        if isinstance(value, bool):  # before int: bool is an int subclass
            result[name] = task_pb2.ParamValue(bool_value=value)
        elif isinstance(value, int):
            result[name] = task_pb2.ParamValue(int_value=value)
        elif isinstance(value, float):
            result[name] = task_pb2.ParamValue(float_value=value)
        elif isinstance(value, str):
            result[name] = task_pb2.ParamValue(string_value=value)
        else:
            raise TypeError(
                f"parameter {name!r} is a {type(value).__name__}; use int, float, str or bool"
            )
    return result


def params_from_proto(
    params: Mapping[str, task_pb2.ParamValue],
) -> dict[str, Param]:
    """Plain parameter values; a value with no kind set raises ``ValueError``."""
    result: dict[str, Param] = {}
    for name, value in params.items():
        kind = value.WhichOneof("kind")
        if kind is None:
            raise ValueError(f"parameter {name!r} has no value")
        result[name] = getattr(value, kind)
    return result


def state_to_proto(state: TaskState) -> task_pb2.TaskState.ValueType:
    """The ``TaskState`` enum value of a task state."""
    return _STATE_TO_PROTO[state]


def state_from_proto(value: int) -> TaskState | None:
    """The task state of a ``TaskState`` enum value; None for UNSPECIFIED or an unknown one."""
    return _STATE_FROM_PROTO.get(value)


def time_to_proto(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A timestamp message (None for None); a naive datetime is taken as UTC (protobuf's rule)."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def time_from_proto(msg: Message, field: str) -> datetime | None:
    """The timestamp field ``field`` of ``msg`` as an aware UTC datetime; None when unset."""
    if not msg.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(msg, field)
    return stamp.ToDatetime(tzinfo=UTC)

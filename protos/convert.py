"""Conversions between wire-format values and their protobuf messages.

Shared by the client, the broker and the agent, so a tensor header or a parameter is encoded
the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpubroker.protos import task_pb2
from gpubroker.protos.wire import TensorMeta

__all__ = ["meta_from_proto", "meta_to_proto", "params_from_proto", "params_to_proto"]


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
) -> dict[str, int | float | str | bool]:
    """Plain parameter values; a value with no kind set raises ``ValueError``."""
    result: dict[str, int | float | str | bool] = {}
    for name, value in params.items():
        kind = value.WhichOneof("kind")
        if kind is None:
            raise ValueError(f"parameter {name!r} has no value")
        result[name] = getattr(value, kind)
    return result

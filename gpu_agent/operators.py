"""Which operators a user's graph may call: the torch-free policy plus what needs torch.

The policy itself (allowed namespaces, the deny-list of file, process and network operators,
the Python size functions, symbolic-size expressions, refused schema fields) lives in
``gpubroker.protos.modelcheck``, which the broker also runs at upload. This module adds what
only torch can answer: an ATen name torch does not know is refused, and so is any overload
whose schema takes a ``Storage``, a file name or a script object.
"""

from __future__ import annotations

import re

import torch

from gpubroker.protos import modelcheck
from gpubroker.protos.modelcheck import ALLOWED_PYTHON, DENIED_ATEN, check_sym_expr
from gpubroker.protos.modelcheck import GraphRefusedError as OperatorRefusedError

__all__ = [
    "ALLOWED_PYTHON",
    "DENIED_ATEN",
    "OperatorRefusedError",
    "check_sym_expr",
    "check_target",
]

_DENIED_SCHEMA_WORDS = re.compile(r"\bStorage\b|__torch__|\bfilename\b|\bpath\b|\bfile\b")


def check_target(target: str) -> None:
    """Refuse ``target`` (a serialized node target) unless the policy allows it and, for an
    ATen operator, torch knows the overload and its schema touches no storage or file."""
    aten = modelcheck.check_target(target)
    if aten is None:
        return
    name, overload = aten
    packet = getattr(torch.ops.aten, name, None)
    known = packet.overloads() if isinstance(packet, torch._ops.OpOverloadPacket) else []  # type: ignore[no-untyped-call]
    if overload not in known:
        raise OperatorRefusedError(f"operator aten::{name}.{overload} is unknown")
    schema = str(getattr(packet, overload)._schema)
    if _DENIED_SCHEMA_WORDS.search(schema):
        raise OperatorRefusedError(f"operator aten::{name}.{overload} is not allowed: {schema}")

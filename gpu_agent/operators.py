"""Which operators a user's graph may call, and which symbolic-shape expressions it may hold.

Checked on the graph's JSON before torch rebuilds anything from it (``model_loader``).

- ``torch.ops.aten.*`` operators are allowed, because ATen is tensor math, except the ones that
  touch files, processes, the network or raw storage: names in ``DENIED_ATEN`` or starting with
  a prefix in ``DENIED_ATEN_PREFIXES``, and any overload whose schema takes a ``Storage``, a
  file name or a script object. An ATen name torch does not know is refused too.
- A few Python functions export emits for shape arithmetic (``ALLOWED_PYTHON``) are allowed.
- Every other target is refused: other namespaces (``prim``, ``profiler``, ``higher_order``,
  custom ones), extension operators (``#ns:op``) and anything unknown.

Symbolic sizes are stored as sympy ``srepr`` strings, which torch parses with
``sympy.sympify`` (that is ``eval``); ``check_sym_expr`` admits only the sympy constructors and
symbol names export writes.
"""

from __future__ import annotations

import re

import torch

__all__ = ["ALLOWED_PYTHON", "DENIED_ATEN", "check_sym_expr", "check_target"]

ALLOWED_PYTHON = frozenset(
    {f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv")}
    | {f"_operator.{name}" for name in ("mod", "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge")}
    | {f"torch.{name}" for name in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not")}
    | {"torch.sym_sqrt", "torch.sym_ite", "math.ceil", "math.floor", "math.trunc"}
)
"""Pure functions on Python numbers (sizes) that export writes into graphs."""

DENIED_ATEN = frozenset(
    {"from_file", "save", "load", "to_file", "set_", "_debug_has_internal_overlap"}
    | {"_assert_async", "_print", "record_stream", "_make_per_channel_quantized_tensor"}
)
DENIED_ATEN_PREFIXES = ("_load", "_save", "_remote", "_from_file", "_debug", "_cufft", "_nccl")
_DENIED_SCHEMA_WORDS = re.compile(r"\bStorage\b|__torch__|\bfilename\b|\bpath\b|\bfile\b")

_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")


class OperatorRefusedError(ValueError):
    """A graph names an operator or expression outside the allow-list; the message names it."""


def check_target(target: str) -> None:
    """Refuse ``target`` (a serialized node target) unless the policy above allows it."""
    if target in ALLOWED_PYTHON:
        return
    match = _ATEN_TARGET.fullmatch(target)
    if match is None:
        raise OperatorRefusedError(f"operator {target!r} is not allowed (only ATen tensor math)")
    name, overload = match.groups()
    if name in DENIED_ATEN or name.startswith(DENIED_ATEN_PREFIXES):
        raise OperatorRefusedError(f"operator aten::{name} is not allowed")
    packet = getattr(torch.ops.aten, name, None)
    known = packet.overloads() if isinstance(packet, torch._ops.OpOverloadPacket) else []  # type: ignore[no-untyped-call]
    if overload not in known:
        raise OperatorRefusedError(f"operator aten::{name}.{overload} is unknown")
    schema = str(getattr(packet, overload)._schema)
    if _DENIED_SCHEMA_WORDS.search(schema):
        raise OperatorRefusedError(f"operator aten::{name}.{overload} is not allowed: {schema}")


_SYMPY_NAMES = frozenset(
    {"Symbol", "Integer", "Rational", "Float", "Mul", "Add", "Pow", "Min", "Max", "Abs", "Mod"}
    | {"Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "true", "false", "True", "False"}
    | {"StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Equality"}
    | {"Unequality", "BooleanTrue", "BooleanFalse", "positive", "integer", "real", "nonnegative"}
    | {"FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt"}
    | {"FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv"}
    | {"IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt"}
    | {"RoundToInt", "RoundDecimal", "ToFloat", "Identity", "oo", "zoo", "nan", "S"}
)
_SYM_TOKEN = re.compile(
    r"\s+|[A-Za-z]+|'[a-z]+[0-9]+'|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?|[()+\-*/=,<>!]"
)
_MAX_SYM_EXPR = 4096


def check_sym_expr(expr: str) -> None:
    """Refuse a symbolic expression that is not sympy constructors, symbols and numbers."""
    if len(expr) > _MAX_SYM_EXPR:
        raise OperatorRefusedError(f"symbolic expression of {len(expr)} characters is too long")
    position = 0
    while position < len(expr):
        token = _SYM_TOKEN.match(expr, position)
        if token is None:
            raise OperatorRefusedError(
                f"symbolic expression {expr[:80]!r} has a character not allowed at {position}"
            )
        word = token.group()
        if (
            word[0].isalpha()
            and word not in _SYMPY_NAMES
            and not re.fullmatch(r"[a-z]+[0-9]+", word)
        ):
            raise OperatorRefusedError(f"symbolic expression {expr[:80]!r} names {word!r}")
        position = token.end()

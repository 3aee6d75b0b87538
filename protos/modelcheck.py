"""The graph policy of users' models that needs no torch: what a graph's JSON may name.

Shared by the broker, which refuses a hostile graph at upload, and the agent's loader, which
checks again before torch sees anything (and adds the checks that need torch: that an ATen
overload exists, and that its schema takes no storage, file name or script object).

- ``torch.ops.aten.*`` targets are allowed, because ATen is tensor math, except the ones that
  touch files, processes, the network or raw storage: names in ``DENIED_ATEN`` or starting with
  a prefix in ``DENIED_ATEN_PREFIXES``.
- A few Python functions export emits for shape arithmetic (``ALLOWED_PYTHON``) are allowed.
- Every other target is refused: other namespaces (``prim``, ``profiler``, ``higher_order``,
  custom ones), extension operators (``#ns:op``) and anything unknown.
- Schema fields for script objects, subgraphs and operators passed as values
  (``REFUSED_KEYS``) are refused wherever they hold something, and the JSON may nest at most
  ``MAX_JSON_DEPTH`` deep.
- Symbolic sizes are sympy ``srepr`` strings, which torch parses with ``sympy.sympify`` (that
  is ``eval``); ``check_sym_expr`` admits only the sympy constructors and symbol names export
  writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

__all__ = [
    "ALLOWED_PYTHON",
    "DENIED_ATEN",
    "DENIED_ATEN_PREFIXES",
    "MAX_JSON_DEPTH",
    "REFUSED_KEYS",
    "GraphRefusedError",
    "check_document",
    "check_graph",
    "check_graph_json",
    "check_sym_expr",
    "check_target",
    "node_targets",
]

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
"""ATen operators that touch files, processes, the network or raw storage."""
DENIED_ATEN_PREFIXES = ("_load", "_save", "_remote", "_from_file", "_debug", "_cufft", "_nccl")
"""ATen name prefixes refused for the same reasons as ``DENIED_ATEN``."""

REFUSED_KEYS = frozenset(
    {"as_custom_obj", "custom_obj", "custom_obj_values", "as_graph", "as_operator"}
)
"""Schema fields for script objects, subgraphs and operators passed as values: never allowed."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of the graph JSON (export's own graphs stay far below it)."""

_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")


class GraphRefusedError(ValueError):
    """A graph names an operator, field or expression outside the policy; the message says which."""


def check_target(target: str) -> tuple[str, str] | None:
    """Refuse ``target`` (a serialized node target) unless the policy above allows it.

    Returns the ATen ``(name, overload)`` of an ATen target, for checks that need torch; None
    for an allowed Python function.
    """
    if target in ALLOWED_PYTHON:
        return None
    match = _ATEN_TARGET.fullmatch(target)
    if match is None:
        raise GraphRefusedError(f"operator {target!r} is not allowed (only ATen tensor math)")
    name, overload = match.groups()
    if name in DENIED_ATEN or name.startswith(DENIED_ATEN_PREFIXES):
        raise GraphRefusedError(f"operator aten::{name} is not allowed")
    return name, overload


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
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")
_MAX_SYM_EXPR = 4096


def check_sym_expr(expr: str) -> None:
    """Refuse a symbolic expression that is not sympy constructors, symbols and numbers."""
    if len(expr) > _MAX_SYM_EXPR:
        raise GraphRefusedError(f"symbolic expression of {len(expr)} characters is too long")
    position = 0
    while position < len(expr):
        token = _SYM_TOKEN.match(expr, position)
        if token is None:
            raise GraphRefusedError(
                f"symbolic expression {expr[:80]!r} has a character not allowed at {position}"
            )
        word = token.group()
        if word[0].isalpha() and word not in _SYMPY_NAMES and not _SYMBOL_NAME.fullmatch(word):
            raise GraphRefusedError(f"symbolic expression {expr[:80]!r} names {word!r}")
        position = token.end()


def check_document(document: object) -> None:
    """The checks on the whole JSON document: its depth, refused fields, symbolic sizes."""
    _check_depth(document)
    for key, value in _walk(document):
        if key == "expr_str":
            if not isinstance(value, str):
                raise GraphRefusedError(f"symbolic expression {value!r} is not a string")
            check_sym_expr(value)
        elif key in REFUSED_KEYS and value:
            raise GraphRefusedError(f"the graph uses {key!r}, which is not allowed")


def node_targets(document: object) -> list[str]:
    """The targets of the nodes of an exported program's JSON, in order.

    Raises ``GraphRefusedError`` when the document is not shaped like one.
    """
    nodes = _get(_get(_get(document, "graph_module"), "graph"), "nodes")
    if not isinstance(nodes, list):
        raise GraphRefusedError("the graph is not an exported program: its nodes are not a list")
    targets = []
    for index, node in enumerate(nodes):
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str):
            raise GraphRefusedError(f"node {index} of the graph has no target string")
        targets.append(target)
    return targets


def check_graph(document: object) -> None:
    """Every torch-free check of an exported program's JSON: ``check_document``, then every
    node's target."""
    check_document(document)
    for target in node_targets(document):
        check_target(target)


def check_graph_json(graph: bytes | str) -> None:
    """``check_graph`` on the graph section of a model file (UTF-8 JSON)."""
    try:
        document = json.loads(graph)
    except (ValueError, RecursionError) as exc:
        raise GraphRefusedError(f"the graph is not valid JSON: {exc}") from None
    check_graph(document)


def _get(value: object, key: str) -> object:
    if not isinstance(value, dict) or key not in value:
        raise GraphRefusedError(f"the graph is not an exported program: it has no {key!r}")
    return value[key]


def _walk(value: object) -> Iterator[tuple[str, object]]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                yield key, inner
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


def _check_depth(document: object) -> None:
    stack: list[tuple[object, int]] = [(document, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise GraphRefusedError(f"the graph JSON nests deeper than {MAX_JSON_DEPTH}")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)

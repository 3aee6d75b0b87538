"""How the broker process writes its log: one line per record, peer text escaped.

Log lines quote text that peers choose (agent ids, workload names, reasons, exception
messages). ``EscapingFormatter`` writes control characters in a record's message as escapes
(``\\n``, ``\\r``, ``\\x1b``...), so no peer can start a forged line or colour a terminal; a
traceback keeps its line breaks, each of its lines indented (a forged line inside an exception's
message never starts where a record does) and escaped.

gRPC's C core writes to stderr on its own, not through Python logging; at INFO it prints
text from unauthenticated peers verbatim (a GOAWAY's debug data, newlines included).
``quiet_grpc_core`` sets ``GRPC_VERBOSITY=ERROR`` unless the operator chose a level.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import MutableMapping
from typing import Any

__all__ = ["FORMAT", "EscapingFormatter", "escape_control", "quiet_grpc_core"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""The broker's log line."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def escape_control(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with its control characters written as escapes (newlines kept if asked)."""
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_escape, text)


class EscapingFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose message part never holds a raw control character."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join(f"  {line}" for line in escape_control(text, keep_newlines=True).split("\n"))


def quiet_grpc_core(environ: MutableMapping[str, str] = os.environ) -> None:
    """Keeps gRPC's C core to errors unless ``GRPC_VERBOSITY`` is set; call before it starts."""
    environ.setdefault("GRPC_VERBOSITY", "ERROR")

"""The broker's log lines: peers' text can neither forge a line nor colour a terminal."""

from __future__ import annotations

import logging
import sys

from gpubroker.logformat import FORMAT, EscapingFormatter, escape_control, quiet_grpc_core

EVIL = "agent-1\n2030-01-01 00:00:00,000 INFO gpubroker.broker: forged\r\x1b[31mred\x00\u2028"


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(EVIL)
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("gpubroker.test", logging.INFO, __file__, 1, msg, args, exc_info)


def test_a_message_quoting_peer_text_is_one_line_with_escapes() -> None:
    line = EscapingFormatter(FORMAT).format(_record("agent %s connected", EVIL))

    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x00" not in line
    assert "\u2028" not in line
    assert "agent-1\\n2030-01-01 00:00:00,000 INFO gpubroker.broker: forged\\r\\x1b[31mred" in line


def test_a_traceback_keeps_its_lines_but_escapes_the_rest() -> None:
    text = EscapingFormatter(FORMAT).format(_record("failed", exc=True))

    lines = text.splitlines()
    assert lines[1] == "  Traceback (most recent call last):"
    assert all(line.startswith("  ") for line in lines[1:])  # only a record starts a line
    assert "\x1b" not in text and "\r" not in text


def test_escaping_names_the_common_characters() -> None:
    assert escape_control("a\tb\x7f\x9b") == "a\\tb\\x7f\\x9b"
    assert escape_control("a\nb", keep_newlines=True) == "a\nb"


def test_grpc_core_is_quiet_unless_the_operator_chose_a_level() -> None:
    unset: dict[str, str] = {}
    chosen = {"GRPC_VERBOSITY": "debug"}

    quiet_grpc_core(unset)
    quiet_grpc_core(chosen)

    assert unset == {"GRPC_VERBOSITY": "ERROR"}
    assert chosen == {"GRPC_VERBOSITY": "debug"}

"""JSON log lines: one object per record, the task's fields from ``extra`` or the context."""

from __future__ import annotations

import json
import logging
import sys

from gpubroker.logformat import (
    FORMAT,
    EscapingFormatter,
    GrpcCoreLog,
    JsonFormatter,
    TaskContextFilter,
    task_context,
    task_fields,
)

EVIL = 'agent-1\n{"level": "INFO"}\r\x1b[31m\u2028'


def _line(record: logging.LogRecord) -> dict[str, object]:
    TaskContextFilter().filter(record)
    text = JsonFormatter().format(record)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\u2028" not in text
    parsed = json.loads(text)
    assert isinstance(parsed, dict)
    return parsed


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gpubroker.test", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_a_record_about_a_task_carries_its_fields_and_peer_text_stays_on_one_line() -> None:
    line = _line(_record("agent %s said", EVIL, **task_fields("t1", "acme", 2, "a-9")))

    assert line["message"] == f"agent {EVIL} said"
    assert (line["task_id"], line["tenant"], line["attempt"], line["agent"]) == (
        "t1", "acme", 2, "a-9",
    )  # fmt: skip
    assert line["level"] == "INFO" and line["logger"] == "gpubroker.test"


def test_a_task_context_names_the_task_in_every_record_inside_it_only() -> None:
    with task_context("t2", tenant="globex"):
        inside = _line(_record("working"))
        explicit = _line(_record("other", **task_fields("t3")))
    outside = _line(_record("done"))

    assert (inside["task_id"], inside["tenant"]) == ("t2", "globex")
    assert explicit["task_id"] == "t3"
    assert "task_id" not in outside


def test_an_exception_is_one_field_of_the_line() -> None:
    try:
        raise ValueError(EVIL)
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())

    line = _line(record)

    assert "ValueError" in str(line["exception"]) and line["level"] == "ERROR"


def test_absl_lines_keep_their_level_and_source_and_others_are_warnings() -> None:
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("grpc.core.test")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r)})())
    core = GrpcCoreLog(logger)

    core.route("I1206 11:33:46.471134   11048 chttp2_transport.cc:1403] Got goaway")
    core.route("W0000 00:00:1744377140.613412 35892123 init.cc:229] slow")
    core.route("WARNING: All log messages before absl::InitializeLog() is called go to STDERR")
    core.route("   ")

    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", "Got goaway"),
        ("WARNING", "slow"),
        (
            "WARNING",
            "WARNING: All log messages before absl::InitializeLog() is called go to STDERR",
        ),
    ]
    assert records[0].__dict__["source"] == "chttp2_transport.cc:1403"


def test_a_text_line_about_a_task_ends_with_its_fields_escaped() -> None:
    record = _record("attempt done", **task_fields("t1", "acme", 2, EVIL))
    TaskContextFilter().filter(record)

    text = EscapingFormatter(FORMAT).format(record)

    assert "\n" not in text and "\x1b" not in text and "\u2028" not in text
    assert text.endswith(
        'attempt done [task_id=t1 tenant=acme attempt=2 agent=agent-1\\n{"level": "INFO"}'
        "\\r\\x1b[31m\\u2028]"
    )
    plain = EscapingFormatter(FORMAT).format(_record("no task here"))
    assert plain.endswith("no task here")

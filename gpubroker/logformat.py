"""How the broker and the agent write their logs: one line per record, as text or JSON, peers'
text escaped, the task a line is about named in it, and gRPC's C core routed through it.

Log lines quote text that peers choose (agent ids, workload names, reasons, exception
messages). ``EscapingFormatter`` writes control characters in a record's message as escapes
(``\\n``, ``\\r``, ``\\x1b``...), so no peer can start a forged line or colour a terminal; a
traceback keeps its line breaks, each of its lines indented (a forged line inside an exception's
message never starts where a record does) and escaped.

``JsonFormatter`` writes each record as one JSON object (``--log-format json``): ``time``,
``level``, ``logger``, ``message``, and the task fields ``task_id``, ``tenant``, ``attempt``
and ``agent`` on every line about a task. Code names the task with ``extra=task_fields(...)``
on a call, or for a whole block with ``with task_context(...)`` (a context variable that
``TaskContextFilter`` copies onto each record).

gRPC's C core writes to stderr on its own (absl logging; Python has no hook into it); at INFO it
prints text from unauthenticated peers verbatim (a GOAWAY's debug data, newlines included).
``quiet_grpc_core`` sets ``GRPC_VERBOSITY=ERROR`` unless the operator chose a level, and
``GrpcCoreLog`` routes what it still prints through Python logging (logger ``grpc.core``): file
descriptor 2 becomes a pipe that a thread reads line by line, while Python's own ``sys.stderr``
keeps the original descriptor, so tracebacks and click's messages never wait on that thread.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import faulthandler
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

import click

__all__ = [
    "FORMAT",
    "LOG_FORMATS",
    "TASK_FIELDS",
    "EscapingFormatter",
    "GrpcCoreLog",
    "JsonFormatter",
    "TaskContextFilter",
    "configure_logging",
    "escape_control",
    "log_format_option",
    "quiet_grpc_core",
    "task_context",
    "task_fields",
]

LOG_FORMATS = ("text", "json")
"""Values of ``--log-format``."""

log_format_option = click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    envvar="GPUBROKER_LOG_FORMAT",
    default="text",
    show_default=True,
    help="One line per record: text, or JSON objects with the task's id, tenant, attempt "
    "and agent [env: GPUBROKER_LOG_FORMAT].",
)
"""``--log-format`` for the broker's and the agent's commands."""

TASK_FIELDS = ("task_id", "tenant", "attempt", "agent")
"""The fields that name the task a line is about (record attributes and JSON keys)."""

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
    """A ``logging.Formatter`` whose message part never holds a raw control character, and
    which ends a line about a task with its fields (``[task_id=... tenant=... attempt=...
    agent=...]``, those present)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        fields = [f"{k}={getattr(record, k)}" for k in TASK_FIELDS if getattr(record, k, None)]
        if fields:  # the task the line is about, as JSON lines carry it: `[task_id=... ...]`
            record.message += f" [{escape_control(' '.join(fields))}]"
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


_NO_TASK: Mapping[str, object] = MappingProxyType({})
_TASK: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "gpubroker_log_task", default=_NO_TASK
)


def task_fields(
    task_id: str,
    tenant: str | None = None,
    attempt: int | None = None,
    agent: str | None = None,
) -> dict[str, object]:
    """The task fields of one log call, for ``extra=``; fields that are None are left out."""
    values = {"task_id": task_id, "tenant": tenant, "attempt": attempt, "agent": agent}
    return {k: v for k, v in values.items() if v is not None}


@contextlib.contextmanager
def task_context(
    task_id: str,
    tenant: str | None = None,
    attempt: int | None = None,
    agent: str | None = None,
) -> Iterator[None]:
    """Names the task in every record logged inside the block (this task or thread only)."""
    token = _TASK.set({**_TASK.get(), **task_fields(task_id, tenant, attempt, agent)})
    try:
        yield
    finally:
        _TASK.reset(token)


class TaskContextFilter(logging.Filter):
    """Copies the ``task_context`` fields onto each record that has none of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _TASK.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the task fields present, and ``exception`` (the traceback) when there is one.

    Written as ASCII: JSON escapes every control character and everything else beyond ASCII
    (U+2028, NEL), so no peer's text can start a line.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in TASK_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        for key in ("duration_s", "compute_s", "outcome", "code", "source"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)  # ASCII: no raw U+2028, NEL or C1 control


_CORE_LINE = re.compile(
    r"^(?P<level>[IWEF])\d{4} [\d:.]+\s+\d+\s+(?P<where>[^\]\s]+)\]\s?(?P<message>.*)$"
)
_CORE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


class GrpcCoreLog:
    """Routes what the process's C code writes to stderr (gRPC's C core, above all) through
    Python logging, as records of the ``grpc.core`` logger.

    ``start`` points file descriptor 2 at a pipe and ``sys.stderr`` at a copy of the original
    descriptor; a daemon thread turns each line from the pipe into a record: absl's
    ``E1206 11:33:46.471134 11048 file.cc:12] message`` lines at their level (the source
    location in the ``source`` field), any other line at WARNING. ``stop`` (also at exit) puts
    descriptor 2 back and waits briefly for the last lines.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("grpc.core")
        self._saved_fd: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> TextIO:
        """Starts routing; returns the stream on the original stderr, for log handlers."""
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        stream = open(  # noqa: SIM115 (it outlives this call: the log writes to it)
            self._saved_fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False
        )
        sys.stderr = stream
        # Python's own fatal errors (a segfault's traceback) go to the real stderr: this thread
        # dies with the process and could not log them.
        faulthandler.enable(file=stream)
        self._thread = threading.Thread(
            target=self._pump, args=(read_fd,), name="grpc-core-log", daemon=True
        )
        self._thread.start()
        atexit.register(self.stop)
        return stream

    def stop(self) -> None:
        """Puts descriptor 2 back and lets the thread log what is left."""
        if self._saved_fd is None:
            return
        saved, self._saved_fd = self._saved_fd, None
        os.dup2(saved, 2)  # the pipe's last writer is gone: the thread reads to its end
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _pump(self, read_fd: int) -> None:
        # Draining must never stop: a full pipe would block every C thread that logs.
        with open(read_fd, "rb") as pipe:
            for raw in pipe:
                try:
                    self.route(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                except Exception:  # whatever a handler raises, keep reading
                    continue

    def route(self, line: str) -> None:
        """Logs one line the C code printed."""
        if not line.strip():
            return
        match = _CORE_LINE.match(line)
        if match is None:
            self._logger.warning("%s", line)
            return
        level = _CORE_LEVELS[match["level"]]
        self._logger.log(level, "%s", match["message"], extra={"source": match["where"]})


def _stderr_is_fd_2() -> bool:
    """True when ``sys.stderr`` writes to file descriptor 2 (not to a test's capture, say):
    only then is routing descriptor 2 through the log the process's own business."""
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def configure_logging(
    level: str,
    log_format: str = "text",
    *,
    route_grpc_core: bool = True,
    environ: MutableMapping[str, str] = os.environ,
) -> None:
    """Sets up the process's log: one record per line on stderr, as escaped text or JSON, with
    the task fields of ``task_context``; gRPC's C core kept to errors unless
    ``GRPC_VERBOSITY`` says otherwise and (``route_grpc_core``) routed through this log when
    ``sys.stderr`` is descriptor 2.

    Call it first, before anything loads grpc: the C core reads ``GRPC_VERBOSITY`` as it loads.

    Raises:
        ValueError: an unknown format or level.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    quiet_grpc_core(environ)
    stream = GrpcCoreLog().start() if route_grpc_core and _stderr_is_fd_2() else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else EscapingFormatter(FORMAT))
    handler.addFilter(TaskContextFilter())
    logging.basicConfig(level=numeric, handlers=[handler], force=True)

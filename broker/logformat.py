"""The broker's log format; it lives in ``gpubroker.logformat``, shared with the agent."""

from __future__ import annotations

from gpubroker.logformat import (
    FORMAT,
    LOG_FORMATS,
    EscapingFormatter,
    JsonFormatter,
    configure_logging,
    escape_control,
    log_format_option,
    quiet_grpc_core,
    task_context,
    task_fields,
)

__all__ = [
    "FORMAT",
    "LOG_FORMATS",
    "EscapingFormatter",
    "JsonFormatter",
    "configure_logging",
    "escape_control",
    "log_format_option",
    "quiet_grpc_core",
    "task_context",
    "task_fields",
]

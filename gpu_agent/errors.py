"""Agent errors; each maps to the status code reported with a failed attempt.

AgentError
├── UnknownWorkloadError    INVALID_ARGUMENT
├── WorkloadArgumentError   INVALID_ARGUMENT  (bad inputs or params)
└── TaskCancelledError      the attempt was revoked; nothing is reported
"""

from __future__ import annotations

__all__ = ["AgentError", "TaskCancelledError", "UnknownWorkloadError", "WorkloadArgumentError"]


class AgentError(Exception):
    """Base class for agent errors."""


class UnknownWorkloadError(AgentError):
    """No workload is registered under the name."""


class WorkloadArgumentError(AgentError):
    """A workload's inputs or parameters are not acceptable."""


class TaskCancelledError(AgentError):
    """The attempt was cancelled while it ran."""

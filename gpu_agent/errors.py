"""Agent errors; each one that ends an attempt maps to the status code reported for it.

AgentError
├── UnknownWorkloadError    INVALID_ARGUMENT   no workload of that name on this agent
├── WorkloadArgumentError   INVALID_ARGUMENT   inputs or params the workload's validation refused
├── WorkloadFailedError     ABORTED            the workload raised anything else
├── ModelUnusableError      INVALID_ARGUMENT   a model file failed its size, hash or graph checks
├── TaskDeadlineError       DEADLINE_EXCEEDED  the task's timeout passed
├── TaskCancelledError      (nothing reported) the broker revoked the attempt, or it was lost
├── WorkloadLoadError       (start-up)         an entry-point workload cannot be loaded
├── BrokerProtocolError     (reconnect)        the broker broke the agent protocol
└── JoinRefusedError        (exit)             the broker refused the agent's join token
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "BrokerProtocolError",
    "JoinRefusedError",
    "ModelUnusableError",
    "TaskCancelledError",
    "TaskDeadlineError",
    "UnknownWorkloadError",
    "WorkloadArgumentError",
    "WorkloadFailedError",
    "WorkloadLoadError",
]


class AgentError(Exception):
    """Base class for agent errors."""


class UnknownWorkloadError(AgentError):
    """No workload is registered under the name."""


class WorkloadArgumentError(AgentError):
    """A workload's inputs or parameters are not acceptable."""


class WorkloadFailedError(AgentError):
    """The workload raised an exception of its own; the message names its type."""


class ModelUnusableError(AgentError):
    """A model file came with the wrong size or hash, or the loader refused its graph."""


class TaskDeadlineError(AgentError):
    """The task's deadline passed before its result was ready."""


class TaskCancelledError(AgentError):
    """The attempt was cancelled (or lost with its control stream) while it ran."""


class WorkloadLoadError(AgentError):
    """An operator's workload entry point could not be loaded."""


class BrokerProtocolError(AgentError):
    """The broker answered in a way the agent protocol does not allow."""


class JoinRefusedError(AgentError):
    """The broker answered UNAUTHENTICATED: this agent's join token is missing or wrong.

    Retrying cannot help (the token is fixed for the process's life), so the agent stops.
    """

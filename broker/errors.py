"""Broker errors, one class per condition; the servicers map them to gRPC status codes.

BrokerError
├── InvalidTaskError          INVALID_ARGUMENT  (malformed header, bytes, params)
│   ├── UnknownWorkloadError  INVALID_ARGUMENT
│   ├── InvalidModelError     INVALID_ARGUMENT  (a malformed, mismatched or refused model)
│   └── UploadCutShortError   INVALID_ARGUMENT  (a stream ended before its declared bytes)
├── LimitExceededError        RESOURCE_EXHAUSTED (a size or count limit)
│   ├── BudgetExceededError   RESOURCE_EXHAUSTED (the month's budget is spent)
│   ├── ModelQuotaError       RESOURCE_EXHAUSTED (the tenant's model quota is full)
│   └── SpoolFullError        RESOURCE_EXHAUSTED (the spool's disk is below its free floor)
├── TaskNotFoundError         NOT_FOUND          (also another tenant's task)
├── ModelNotFoundError        NOT_FOUND          (also another tenant's model)
├── ResultExpiredError        NOT_FOUND          (a result deleted by the retention sweep)
├── ModelInUseError           FAILED_PRECONDITION (a delete while live tasks name the model)
├── RequestConflictError      ALREADY_EXISTS     (request_id reused for other work)
├── UnauthenticatedError      UNAUTHENTICATED
├── StaleAttemptError         FAILED_PRECONDITION (a result or fetch from a lost lease)
├── AgentRefusedError         FAILED_PRECONDITION (an agent the broker cannot bill for)
├── NoMatchingGpuError        FAILED_PRECONDITION (no GPU type the broker can get fits a task)
├── PayloadLostError          DATA_LOSS          (a result file gone, e.g. after an OS crash)
├── SchemaOutdatedError       (start-up)         the database needs `make migrate`
└── TaskEndedError            the task ended without a result; carries its status code
"""

from __future__ import annotations

from gpubroker.protos.states import FailureCode

__all__ = [
    "AgentRefusedError",
    "BrokerError",
    "BudgetExceededError",
    "ConfigError",
    "InvalidModelError",
    "InvalidTaskError",
    "LimitExceededError",
    "ModelInUseError",
    "ModelNotFoundError",
    "ModelQuotaError",
    "NoMatchingGpuError",
    "PayloadLostError",
    "RequestConflictError",
    "ResultExpiredError",
    "SchemaOutdatedError",
    "SpoolFullError",
    "StaleAttemptError",
    "TaskEndedError",
    "TaskNotFoundError",
    "UnauthenticatedError",
    "UnknownWorkloadError",
    "UploadCutShortError",
]


class BrokerError(Exception):
    """Base class for broker errors."""


class InvalidTaskError(BrokerError):
    """A task's header, parameters or bytes are malformed."""


class UnknownWorkloadError(InvalidTaskError):
    """No agent has advertised the named workload."""


class InvalidModelError(InvalidTaskError):
    """A model upload is malformed, does not match its header, or calls what agents refuse."""


class UploadCutShortError(InvalidTaskError):
    """An upload ended before every declared byte arrived (its sender most likely died)."""


class LimitExceededError(BrokerError):
    """A task is larger than the broker accepts."""


class BudgetExceededError(LimitExceededError):
    """The tenant has spent its monthly budget."""


class TaskNotFoundError(BrokerError):
    """No task with this id belongs to the caller."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} not found")
        self.task_id = task_id


class ModelQuotaError(LimitExceededError):
    """A model upload would take the tenant past its model quota."""


class SpoolFullError(LimitExceededError):
    """The spool's filesystem has less free space than the broker keeps free: uploads that
    would be written to it are refused before any byte is."""


class ResultExpiredError(BrokerError):
    """A succeeded task's outputs were deleted once their retention ran out."""


class ModelNotFoundError(BrokerError):
    """No model with this id belongs to the caller (nothing says whether another tenant's does)."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"no model {model_id}")
        self.model_id = model_id


class ModelInUseError(BrokerError):
    """Queued or running tasks still name the model a caller asked to delete."""


class RequestConflictError(BrokerError):
    """A request_id was reused for a different task."""


class UnauthenticatedError(BrokerError):
    """The caller presented no valid credentials."""


class StaleAttemptError(BrokerError):
    """An agent spoke for an attempt that is no longer current."""


class AgentRefusedError(BrokerError):
    """An agent cannot join, e.g. because its GPU type has no price."""


class NoMatchingGpuError(BrokerError):
    """A task requires a GPU that no type the broker can start or reach provides."""


class ConfigError(BrokerError):
    """The broker's configuration is invalid (refused at start-up)."""


class SchemaOutdatedError(BrokerError):
    """The database schema is not at the revision this broker needs."""


class PayloadLostError(BrokerError):
    """A succeeded task's result file is missing or short (``Task.call_bound`` results are not
    fsynced, so an OS crash can take them)."""


class TaskEndedError(BrokerError):
    """The task finished without a result (failed or cancelled).

    ``code`` says why, e.g. ``FailureCode.ABORTED`` or ``FailureCode.CANCELLED``; the edge
    answers with the gRPC status of that name.
    """

    def __init__(self, code: FailureCode, message: str) -> None:
        super().__init__(message)
        self.code = code

"""One INFO line per task outcome, with the fields that name the task (``gpubroker.logformat``).

``log_outcome`` is a ``TaskEvents`` listener: each task that reaches a final state (succeeded,
failed, cancelled) is logged once, with its duration since submission, the compute it was
billed, its attempt and its agent; a failure also with its code and message.
"""

from __future__ import annotations

import logging

from gpubroker.broker.model import Task, TaskState
from gpubroker.logformat import task_fields

__all__ = ["log_outcome"]

logger = logging.getLogger("gpubroker.broker.tasks")


def log_outcome(task: Task) -> None:
    """Logs ``task``'s outcome if this snapshot is final; ignores the others."""
    if not task.state.is_final:
        return
    end = task.finished_at or task.started_at or task.created_at
    duration = max((end - task.created_at).total_seconds(), 0.0)
    compute = task.compute_seconds if task.state is TaskState.SUCCEEDED else 0.0
    extra: dict[str, object] = task_fields(task.id, task.tenant, task.attempt, task.agent_id)
    extra |= {"outcome": task.state.value, "duration_s": round(duration, 6)}
    extra["compute_s"] = round(compute or 0.0, 6)
    if task.state is TaskState.SUCCEEDED:
        logger.info(
            "task %s succeeded: %s in %.3f s, %.3f s of compute billed (attempt %d on %s)",
            task.id, task.workload, duration, compute or 0.0, task.attempt, task.agent_id,
            extra=extra,
        )  # fmt: skip
        return
    code = "UNKNOWN" if task.error_code is None else task.error_code.value
    extra["code"] = code
    logger.info(
        "task %s %s: %s after %.3f s, nothing billed (attempt %d on %s): %s: %s",
        task.id, task.state.value, task.workload, duration, task.attempt,
        task.agent_id or "no agent", code, task.error_message or "",
        extra=extra,
    )  # fmt: skip

"""Task handles: ``TaskHandle`` for ``Client`` and ``AsyncTaskHandle`` for ``AsyncClient``.

A handle holds a task id and the client that made it; every method is one call to the broker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpubroker.client._types import TaskResult, TaskStatus
from gpubroker.client.codec import OutputKind
from gpubroker.client.progress import Progress, progress_callback

if TYPE_CHECKING:
    from gpubroker.client._async import AsyncClient
    from gpubroker.client._sync import Client

__all__ = ["AsyncTaskHandle", "TaskHandle"]


class TaskHandle:
    """A submitted task, future-style: poll it, wait for it, fetch its result or cancel it."""

    def __init__(self, client: Client, task_id: str, output: OutputKind) -> None:
        self._client = client
        self.task_id = task_id
        self._output = output

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"

    def status(self) -> TaskStatus:
        """The task's current status."""
        return self._client._status(self.task_id)

    def done(self) -> bool:
        """True once the task is final (succeeded, failed or cancelled)."""
        return self.status().state.is_final

    def result(
        self,
        timeout: float | None = None,
        *,
        output: OutputKind | None = None,
        progress: Progress = None,
    ) -> TaskResult:
        """Waits for the task and returns its outputs, as ``output`` kind if given.

        ``progress`` reports the outputs' download: a callable ``(direction, done_bytes,
        total_bytes)``, or True for a bar (see ``gpubroker.client.progress``).

        Raises:
            DeadlineExceededError: ``timeout`` seconds passed first (the task goes on).
            TaskFailedError: The workload raised (or the task's own error class, e.g.
                ``InvalidArgumentError``).
            TaskCancelledError: The task was cancelled.
        """
        return self._client._result(
            self.task_id, output or self._output, timeout, progress_callback(progress)
        )

    def wait(self, timeout: float | None = None) -> TaskStatus:
        """Waits until the task is final and returns its status, whether it succeeded or not.

        Raises:
            DeadlineExceededError: ``timeout`` seconds passed first (the task goes on).
        """
        final = None
        for status in self._client.watch(self.task_id, timeout):
            final = status
        return final if final is not None else self.status()

    def cancel(self) -> TaskStatus:
        """Cancels the task if it is still queued or running; returns its status after."""
        return self._client._cancel(self.task_id)


class AsyncTaskHandle:
    """A submitted task with awaitable methods; see ``TaskHandle``."""

    def __init__(self, client: AsyncClient, task_id: str, output: OutputKind) -> None:
        self._client = client
        self.task_id = task_id
        self._output = output

    def __repr__(self) -> str:
        return f"AsyncTaskHandle({self.task_id!r})"

    async def status(self) -> TaskStatus:
        """The task's current status."""
        return await self._client._status(self.task_id)

    async def done(self) -> bool:
        """True once the task is final (succeeded, failed or cancelled)."""
        return (await self.status()).state.is_final

    async def result(
        self,
        timeout: float | None = None,
        *,
        output: OutputKind | None = None,
        progress: Progress = None,
    ) -> TaskResult:
        """Waits for the task and returns its outputs; see ``TaskHandle.result``."""
        return await self._client._result(
            self.task_id, output or self._output, timeout, progress_callback(progress)
        )

    async def wait(self, timeout: float | None = None) -> TaskStatus:
        """Waits until the task is final and returns its status; see ``TaskHandle.wait``."""
        final = None
        async for status in self._client.watch(self.task_id, timeout):
            final = status
        return final if final is not None else await self.status()

    async def cancel(self) -> TaskStatus:
        """Cancels the task if it is still queued or running; returns its status after."""
        return await self._client._cancel(self.task_id)

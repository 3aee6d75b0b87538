"""One assignment being worked on: fetch its inputs, run it, report its outcome.

An attempt can be revoked at any point: cancelled by the broker, or lost with the control
stream that brought it. A revoked attempt reports nothing. Its slot is only free once the
workload has actually stopped, which ``Attempt.execute`` waits for before it returns: a worker
thread cannot be interrupted, only asked (through ``WorkloadContext.cancelled``) to stop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import math
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from gpubroker.client.codec import encode
from gpubroker.gpu_agent.batcher import Batcher
from gpubroker.gpu_agent.errors import (
    AgentError,
    ModelUnusableError,
    TaskCancelledError,
    TaskDeadlineError,
    UnknownWorkloadError,
    WorkloadArgumentError,
    WorkloadFailedError,
    WorkloadLoadError,
)
from gpubroker.gpu_agent.gateway import GatewayClient
from gpubroker.gpu_agent.model import Assignment, AttemptRef
from gpubroker.gpu_agent.model_cache import ModelCache
from gpubroker.gpu_agent.runner import Runner, RunOutcome
from gpubroker.gpu_agent.session import Session
from gpubroker.protos import agent_pb2, task_pb2
from gpubroker.protos.modelfile import model_of
from gpubroker.protos.states import FailureCode
from gpubroker.protos.transport import RETRY_AFTER_HEADER
from gpubroker.protos.wire import INLINE_MAX_BYTES, ChecksumMismatchError, WireError

__all__ = ["ERROR_CODES", "RESULT_RETRY_FOR_S", "Attempt", "ModelServices", "Revocation"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

ERROR_CODES: dict[type[AgentError], FailureCode] = {
    UnknownWorkloadError: FailureCode.INVALID_ARGUMENT,
    WorkloadLoadError: FailureCode.FAILED_PRECONDITION,
    WorkloadArgumentError: FailureCode.INVALID_ARGUMENT,
    WorkloadFailedError: FailureCode.ABORTED,
    ModelUnusableError: FailureCode.INVALID_ARGUMENT,
    TaskDeadlineError: FailureCode.DEADLINE_EXCEEDED,
    TaskCancelledError: FailureCode.ABORTED,  # only reported when the workload cancelled itself
}
"""The failure code reported for each error that ends an attempt."""

_STALE_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)

RESULT_RETRY_FOR_S = 900.0
"""How long an attempt keeps its outputs and offers them again while the broker asks it to
(its spool disk is below its free floor; it keeps the attempt leased meanwhile)."""
RETRY_PAUSE_S = (0.05, 60.0)
"""The shortest and longest pause between two offers, whatever the broker asks."""


def retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The wait a refusal asks for before the call is worth repeating, or None if it is not."""
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_HEADER:
            try:
                pause = float(value)
            except ValueError:
                return None
            return (
                None if math.isnan(pause) else min(max(pause, RETRY_PAUSE_S[0]), RETRY_PAUSE_S[1])
            )
    return None


class Revocation(enum.Enum):
    """Why an attempt stopped counting."""

    CANCELLED = "cancelled by the broker"
    LOST = "lost with its control stream"


@dataclass(frozen=True, slots=True)
class ModelServices:
    """What a model task needs beyond an operator task: the model cache and the batcher."""

    cache: ModelCache
    batcher: Batcher


@dataclass(frozen=True, slots=True)
class _Failure:
    code: FailureCode
    message: str


class Attempt:
    """An assignment from fetching its inputs to reporting its outcome."""

    def __init__(
        self,
        assignment: Assignment,
        session: Session,
        gateway: GatewayClient,
        runner: Runner,
        deadline: float | None,
        models: ModelServices | None = None,
    ) -> None:
        self.assignment = assignment
        self.session = session
        """The control stream that brought the assignment."""
        self.compute_seconds: float | None = None
        """The workload's measured time, once it ran to completion."""
        self._gateway = gateway
        self._runner = runner
        self._models = models
        self._deadline = deadline
        self._cancelled = threading.Event()
        self._revoked: asyncio.Future[Revocation] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def ref(self) -> AttemptRef:
        """Which attempt of which task."""
        return self.assignment.ref

    @property
    def revocation(self) -> Revocation | None:
        """Why the attempt was revoked; None while it still counts."""
        return self._revoked.result() if self._revoked.done() else None

    def revoke(self, why: Revocation) -> None:
        """Stops the attempt: its workload is asked to stop and nothing will be reported."""
        if not self._revoked.done():
            self._revoked.set_result(why)
        self._cancelled.set()

    async def execute(self) -> None:
        """Fetches, runs and reports; returns once the workload has actually stopped.

        Failures end up reported to the broker or logged; nothing escapes but cancellation.
        """
        try:
            outcome = await self._compute()
            if not isinstance(outcome, _Failure):
                self.compute_seconds = outcome.compute_seconds
            if self.revocation is not None:
                logger.info("attempt %s stopped: %s", self.ref, self.revocation.value)
                return
            await self._report(outcome)
        except grpc.aio.AioRpcError as exc:
            self._log_refusal(exc)
        except Exception:
            # A bug of ours in one attempt must not take the agent (and its other slots) down.
            logger.exception("attempt %s failed inside the agent", self.ref)
        finally:
            await self._settle()

    async def _compute(self) -> RunOutcome | _Failure:
        assignment = self.assignment
        try:
            fetch = self._spawn(self._gateway.fetch_inputs(assignment))
            inputs = await self._bounded(fetch, abandon=True)
            if model_of(assignment.workload) is not None:
                return await self._run_model(inputs)
            run = self._runner.run(assignment.workload, inputs, assignment.params, self._cancelled)
            return await self._bounded(self._spawn(run), abandon=False)
        except ChecksumMismatchError as exc:
            return _Failure(FailureCode.DATA_LOSS, str(exc))
        except WireError as exc:
            return _Failure(FailureCode.INVALID_ARGUMENT, str(exc))
        except AgentError as exc:
            return _Failure(ERROR_CODES.get(type(exc), FailureCode.INTERNAL), str(exc))

    async def _run_model(self, inputs: list[Any]) -> RunOutcome | _Failure:
        workload, ref = self.assignment.workload, self.assignment.model
        if self._models is None or ref is None or ref.model_id != model_of(workload):
            return _Failure(
                FailureCode.INVALID_ARGUMENT,
                f"workload {workload!r} came without its model reference or this agent runs "
                f"no models",
            )
        model_id, gateway = ref.model_id, self._gateway

        def fetch() -> AsyncIterator[bytes]:
            return gateway.fetch_model(self.ref, model_id)

        # Abandoning either step is safe: the shared load and the batch's call go on without
        # this attempt (see ModelCache.acquire and Batcher.run).
        acquire = self._spawn(self._models.cache.acquire(ref, fetch))
        acquired = await self._bounded(acquire, abandon=True)
        run = self._spawn(self._models.batcher.run(acquired.model, ref, inputs))
        outcome = await self._bounded(run, abandon=True)
        return dataclasses.replace(outcome, model_load_seconds=acquired.load_seconds)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=f"attempt-{self.ref}")
        self._tasks.append(task)
        return task

    async def _bounded(self, work: asyncio.Task[T], *, abandon: bool) -> T:
        """Waits for ``work`` until the deadline or a revocation, whichever comes first.

        On the deadline or a revocation the workload is asked to stop; ``abandon`` also cancels
        ``work`` itself (safe for a gRPC call, pointless for a worker thread).
        """
        loop = asyncio.get_running_loop()
        timeout = None if self._deadline is None else max(self._deadline - loop.time(), 0.0)
        waiters: set[asyncio.Future[Any]] = {work, self._revoked}
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        self._cancelled.set()
        if abandon:
            work.cancel()
        if self.revocation is not None:
            raise TaskCancelledError(f"attempt {self.ref} was {self.revocation.value}")
        raise TaskDeadlineError(
            f"task {self.ref.task_id} ran past its deadline of "
            f"{self.assignment.timeout_s or 0:.3f} s"
        )

    async def _report(self, outcome: RunOutcome | _Failure) -> None:
        if isinstance(outcome, _Failure):
            logger.info("attempt %s failed: %s %s", self.ref, outcome.code.value, outcome.message)
            header = self._gateway.failure_header(self.ref, outcome.code, outcome.message)
            if self.session.protocol >= 2:
                self.session.report(agent_pb2.AgentResult(header=header))
            else:
                await self._gateway.put_result(header)
            return
        encoded = [encode(tensor) for tensor in outcome.outputs]
        header = self._gateway.result_header(self.ref, outcome, [meta for meta, _ in encoded])
        buffers = [data for _, data in encoded]
        if self.session.protocol >= 2 and sum(len(b) for b in buffers) <= INLINE_MAX_BYTES:
            data = b"".join(buffers)
            self.session.report(agent_pb2.AgentResult(header=header, data=data))
            state = "reported"
        else:
            reply = await self._put_result(header, buffers)
            if reply is None:
                return
            state = task_pb2.TaskState.Name(reply)
        logger.debug(
            "attempt %s (%s) done in %.6f s of compute; task %s",
            self.ref,
            self.assignment.workload,
            outcome.compute_seconds,
            state,
        )

    async def _put_result(
        self, header: agent_pb2.ResultHeader, buffers: list[memoryview]
    ) -> task_pb2.TaskState.ValueType | None:
        """``PutResult``, offered again for as long as the broker asks (``retry_after_s``), up to
        ``RESULT_RETRY_FOR_S``; None if the attempt was revoked meanwhile."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RESULT_RETRY_FOR_S
        refusals = 0
        while True:
            try:
                return await self._gateway.put_result(header, buffers)
            except grpc.aio.AioRpcError as exc:
                pause = retry_after_s(exc)
                if pause is None or loop.time() + pause > give_up:
                    raise
                refusals += 1
                level = logging.WARNING if refusals == 1 else logging.DEBUG
                logger.log(
                    level,
                    "attempt %s: the broker cannot store its outputs yet (%s); keeping them and "
                    "offering them again every %g s for up to %g s",
                    self.ref, exc.details(), pause, RESULT_RETRY_FOR_S,
                )  # fmt: skip
            await asyncio.wait({self._revoked}, timeout=pause)
            if self.revocation is not None:
                logger.info("attempt %s stopped with its outputs unsent: %s", self.ref,
                            self.revocation.value)  # fmt: skip
                return None

    def _log_refusal(self, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() in _STALE_CODES:
            logger.info(
                "broker no longer holds attempt %s (%s): %s",
                self.ref,
                exc.code().name,
                exc.details(),
            )
        else:
            logger.warning("attempt %s dropped: %s %s", self.ref, exc.code().name, exc.details())

    async def _settle(self) -> None:
        """Waits for every task of this attempt (the worker thread's above all) to end."""
        if not self._tasks:
            return
        await asyncio.wait(self._tasks)
        for task in self._tasks:
            if not task.cancelled() and (exc := task.exception()) is not None:
                logger.debug("attempt %s: work ended with %r", self.ref, exc)

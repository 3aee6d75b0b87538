"""The agent-facing ``AgentGateway`` service: control streams and per-task data calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from gpubroker.broker.access.auth import Authenticator
from gpubroker.broker.access.refusals import RefusalLog
from gpubroker.broker.api.convert import (
    abort_on_broker_error,
    attempt_from_proto,
    outcome_from_proto,
    split_stream,
)
from gpubroker.broker.core.dispatcher import Dispatcher
from gpubroker.broker.core.models import ModelService
from gpubroker.broker.core.registry import AgentSession, Assign, Close, Outgoing, Revoke
from gpubroker.broker.errors import BrokerError, InvalidTaskError, UnauthenticatedError
from gpubroker.broker.model import AgentInfo, ModelRecord
from gpubroker.broker.storage.spool import Spool
from gpubroker.protos import agent_pb2, agent_pb2_grpc
from gpubroker.protos.convert import meta_to_proto, params_to_proto, state_to_proto
from gpubroker.protos.frames import chunk_message
from gpubroker.protos.transport import CONTROL_PROTOCOL_VERSION

__all__ = ["AgentGatewayServicer"]

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class AgentGatewayServicer(agent_pb2_grpc.AgentGatewayServicer):
    """Lets agents join, take work and move task data."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        spool: Spool,
        auth: Authenticator,
        heartbeat_interval_s: float,
        models: ModelService,
    ) -> None:
        self._dispatcher = dispatcher
        self._models = models
        self._spool = spool
        self._auth = auth
        self._heartbeat_interval_s = heartbeat_interval_s
        self._completing: set[asyncio.Task[None]] = set()
        self._refusals = RefusalLog()

    def _admit(self, context: Context) -> None:
        """Checks the join token; a refusal is logged (once per host per minute) and raised."""
        try:
            self._auth.check_agent(context.invocation_metadata())
        except UnauthenticatedError as exc:
            self._refusals.refused(context.peer(), str(exc))
            raise

    async def Connect(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: Context
    ) -> AsyncIterator[agent_pb2.BrokerMessage]:
        async with abort_on_broker_error(context):
            self._admit(context)
            messages = aiter(request_iterator)
            first = await anext(messages, None)
            if first is None or first.WhichOneof("kind") != "hello":
                raise InvalidTaskError("the control stream must start with a hello message")
            session = await self._dispatcher.connect(_agent_from_proto(first.hello))
            for broken in first.hello.broken_workloads:  # its tasks fail saying why
                logger.warning(
                    "agent %s could not load workload %s: %s",
                    session.agent_id, broken.name, broken.error,
                )  # fmt: skip
        reader = asyncio.create_task(self._read(session, messages))
        try:
            yield agent_pb2.BrokerMessage(
                welcome=agent_pb2.AgentWelcome(
                    agent_id=session.agent_id,
                    heartbeat_interval_seconds=self._heartbeat_interval_s,
                    protocol=min(session.info.protocol, CONTROL_PROTOCOL_VERSION),
                )
            )
            while True:
                items, close = _take_pending(session.outbox, await session.outbox.get())
                if items and session.info.protocol >= 2:
                    yield _batch([_outgoing_to_proto(item, self._models) for item in items])
                else:  # an older agent: one message per write
                    for item in items:
                        yield _outgoing_to_proto(item, self._models)
                if close is not None:
                    break
            logger.info("closing control stream of %s: %s", session.agent_id, close.reason)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await asyncio.shield(self._dispatcher.disconnect(session, "control stream closed"))

    async def FetchInputs(  # type: ignore[override]  # chunks go out as bytes
        self, request: agent_pb2.FetchInputsRequest, context: Context
    ) -> AsyncIterator[agent_pb2.FetchInputsResponse | bytes]:
        async with abort_on_broker_error(context):
            self._admit(context)
            attempt = attempt_from_proto(request.attempt)
            task = await self._dispatcher.leased_task(request.agent_id, attempt)
            async for data in self._spool.inputs(task):
                yield chunk_message(agent_pb2.FetchInputsResponse, data)

    async def FetchModel(  # type: ignore[override]  # chunks go out as bytes
        self, request: agent_pb2.FetchModelRequest, context: Context
    ) -> AsyncIterator[agent_pb2.FetchModelResponse | bytes]:
        async with abort_on_broker_error(context):
            self._admit(context)
            attempt = attempt_from_proto(request.attempt)
            task = await self._dispatcher.leased_task(request.agent_id, attempt)
            async for data in self._models.file_chunks(task, request.model_id):
                yield chunk_message(agent_pb2.FetchModelResponse, data)

    async def PutResult(
        self, request_iterator: AsyncIterator[agent_pb2.PutResultRequest], context: Context
    ) -> agent_pb2.PutResultResponse:
        async with abort_on_broker_error(context):
            self._admit(context)
            header, chunks = await split_stream(request_iterator)
            task = await self._dispatcher.complete(outcome_from_proto(header), chunks)
        return agent_pb2.PutResultResponse(state=state_to_proto(task.state))

    async def _read(
        self, session: AgentSession, messages: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        try:
            async for message in messages:
                if message.WhichOneof("kind") == "batch":
                    for inner in message.batch.messages:
                        await self._handle(session, inner)
                else:
                    await self._handle(session, message)
        finally:
            session.outbox.put_nowait(Close("agent closed the control stream"))

    async def _handle(self, session: AgentSession, message: agent_pb2.AgentMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "credit":
            self._dispatcher.grant(session, message.credit.slots)
        elif kind == "released":
            self._dispatcher.released(session, attempt_from_proto(message.released.attempt))
        elif kind == "heartbeat":
            running = {attempt_from_proto(a) for a in message.heartbeat.running}
            models = message.heartbeat.models
            await self._dispatcher.heartbeat(session, running, models)
        elif kind == "result":
            self._complete_later(session, message.result)
        elif kind == "draining":
            await self._dispatcher.drain(session, message.draining.reason or "agent draining")
        else:  # a newer agent's message kind, or a second hello: not fatal
            logger.warning("ignoring a %s message from %s", kind or "empty", session.agent_id)

    def _complete_later(self, session: AgentSession, result: agent_pb2.AgentResult) -> None:
        """Takes a small result off the control stream without holding up the next message.

        Concurrent completions share one database transaction (group commit), which is why
        each runs in its own task instead of being awaited in turn.
        """
        task = asyncio.create_task(self._complete(session, result))
        self._completing.add(task)
        task.add_done_callback(self._completing.discard)

    async def _complete(self, session: AgentSession, result: agent_pb2.AgentResult) -> None:
        try:
            await self._dispatcher.report(session, outcome_from_proto(result.header), result.data)
        except BrokerError as exc:
            logger.info("result from %s not taken: %s", session.agent_id, exc)
        except Exception:
            logger.exception("result from %s failed", session.agent_id)


def _agent_from_proto(hello: agent_pb2.AgentHello) -> AgentInfo:
    arrived = datetime.now(UTC)
    uptime = hello.uptime_seconds  # NaN and infinity fail the range check below
    return AgentInfo(
        agent_id=hello.agent_id,
        gpu_type=hello.gpu_type or "unknown",
        gpu_memory_bytes=hello.gpu_memory_bytes,
        slots=hello.slots,
        workloads=frozenset(hello.workloads),
        version=hello.version,
        protocol=max(hello.protocol, 1),
        prefetch=hello.prefetch,
        runs_models=hello.runs_models,
        models=frozenset(hello.models),
        connected_at=arrived,
        started_at=arrived - timedelta(seconds=uptime) if 0 < uptime < _MAX_UPTIME_S else None,
    )


_MAX_UPTIME_S = 366 * 86_400.0
"""A reported uptime of a year or more is not believed (a garbled hello, not an agent)."""

MAX_BATCH = 64
"""Most messages sent together on a control stream."""


def _take_pending(
    outbox: asyncio.Queue[Outgoing], first: Outgoing
) -> tuple[list[Assign | Revoke], Close | None]:
    """``first`` and whatever else is already waiting, up to ``MAX_BATCH``, stopping at a Close."""
    items: list[Assign | Revoke] = []
    item: Outgoing | None = first
    while item is not None:
        if isinstance(item, Close):
            return items, item
        items.append(item)
        item = outbox.get_nowait() if not outbox.empty() and len(items) < MAX_BATCH else None
    return items, None


def _batch(messages: list[agent_pb2.BrokerMessage]) -> agent_pb2.BrokerMessage:
    if len(messages) == 1:
        return messages[0]
    return agent_pb2.BrokerMessage(batch=agent_pb2.BrokerBatch(messages=messages))


def _outgoing_to_proto(item: Outgoing, models: ModelService) -> agent_pb2.BrokerMessage:
    if isinstance(item, Revoke):
        attempt = agent_pb2.TaskAttempt(task_id=item.attempt.task_id, attempt=item.attempt.number)
        return agent_pb2.BrokerMessage(
            cancel=agent_pb2.TaskCancel(attempt=attempt, reason=item.reason)
        )
    assert isinstance(item, Assign)
    task = item.task
    timeout = 0.0
    if task.deadline_at is not None and task.started_at is not None:
        timeout = max((task.deadline_at - task.started_at).total_seconds(), 0.001)
    return agent_pb2.BrokerMessage(
        assignment=agent_pb2.TaskAssignment(
            task_id=task.id,
            attempt=task.attempt,
            workload=task.workload,
            inputs=[meta_to_proto(m) for m in task.inputs],
            params=params_to_proto(task.params),
            timeout_seconds=timeout,
            inline_inputs=task.inline_inputs or b"",
            inputs_inline=task.inline_inputs is not None,
            model=_model_ref(models.record_for(task)),
        )
    )


def _model_ref(record: ModelRecord | None) -> agent_pb2.ModelRef | None:
    if record is None:
        return None
    return agent_pb2.ModelRef(
        model_id=record.model_id,
        size_bytes=record.size_bytes,
        max_batch_size=record.max_batch_size,
        max_queue_delay_seconds=record.max_queue_delay_s,
    )

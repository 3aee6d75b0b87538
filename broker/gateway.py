"""The agent-facing ``AgentGateway`` service: control streams and per-task data calls."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from broker.auth import Authenticator
from broker.convert import (
    abort_on_broker_error,
    attempt_from_proto,
    outcome_from_proto,
    split_stream,
    state_to_proto,
)
from broker.dispatcher import Dispatcher
from broker.errors import BrokerError, InvalidTaskError
from broker.model import AgentInfo
from broker.registry import AgentSession, Assign, Close, Outgoing, Revoke
from broker.spool import Spool
from client.proto import meta_to_proto, params_to_proto
from protos import agent_pb2, agent_pb2_grpc, task_pb2

__all__ = ["AgentGatewayServicer"]

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class AgentGatewayServicer(agent_pb2_grpc.AgentGatewayServicer):
    """Lets agents join, take work and move task data."""

    def __init__(
        self, dispatcher: Dispatcher, spool: Spool, auth: Authenticator, heartbeat_interval_s: float
    ) -> None:
        self._dispatcher = dispatcher
        self._spool = spool
        self._auth = auth
        self._heartbeat_interval_s = heartbeat_interval_s
        self._completing: set[asyncio.Task[None]] = set()

    async def Connect(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: Context
    ) -> AsyncIterator[agent_pb2.BrokerMessage]:
        async with abort_on_broker_error(context):
            self._auth.check_agent(context.invocation_metadata())
            messages = aiter(request_iterator)
            first = await anext(messages, None)
            if first is None or first.WhichOneof("kind") != "hello":
                raise InvalidTaskError("the control stream must start with a hello message")
            session = await self._dispatcher.connect(_agent_from_proto(first.hello))
        reader = asyncio.create_task(self._read(session, messages))
        try:
            yield agent_pb2.BrokerMessage(
                welcome=agent_pb2.AgentWelcome(
                    agent_id=session.agent_id,
                    heartbeat_interval_seconds=self._heartbeat_interval_s,
                )
            )
            while not isinstance(item := await session.outbox.get(), Close):
                yield _outgoing_to_proto(item)
            logger.info("closing control stream of %s: %s", session.agent_id, item.reason)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await asyncio.shield(self._dispatcher.disconnect(session, "control stream closed"))

    async def FetchInputs(
        self, request: agent_pb2.FetchInputsRequest, context: Context
    ) -> AsyncIterator[agent_pb2.FetchInputsResponse]:
        async with abort_on_broker_error(context):
            self._auth.check_agent(context.invocation_metadata())
            attempt = attempt_from_proto(request.attempt)
            task = await self._dispatcher.leased_task(request.agent_id, attempt)
            async for data in self._spool.inputs(task):
                yield agent_pb2.FetchInputsResponse(chunk=task_pb2.DataChunk(data=data))

    async def PutResult(
        self, request_iterator: AsyncIterator[agent_pb2.PutResultRequest], context: Context
    ) -> agent_pb2.PutResultResponse:
        async with abort_on_broker_error(context):
            self._auth.check_agent(context.invocation_metadata())
            header, chunks = await split_stream(request_iterator)
            task = await self._dispatcher.complete(outcome_from_proto(header), chunks)
        return agent_pb2.PutResultResponse(state=state_to_proto(task.state))

    async def _read(
        self, session: AgentSession, messages: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        try:
            async for message in messages:
                kind = message.WhichOneof("kind")
                if kind == "credit":
                    self._dispatcher.grant(session, message.credit.slots)
                elif kind == "released":
                    self._dispatcher.released(session, attempt_from_proto(message.released.attempt))
                elif kind == "heartbeat":
                    running = {attempt_from_proto(a) for a in message.heartbeat.running}
                    await self._dispatcher.heartbeat(session, running)
                elif kind == "result":
                    self._complete_later(session, message.result)
                elif kind == "draining":
                    reason = message.draining.reason or "agent draining"
                    await self._dispatcher.drain(session, reason)
        finally:
            session.outbox.put_nowait(Close("agent closed the control stream"))

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
            # The session, not the message, says which agent reports: no one speaks for another.
            outcome = dataclasses.replace(
                outcome_from_proto(result.header), agent_id=session.agent_id
            )
            await self._dispatcher.complete(outcome, _once(result.data))
        except BrokerError as exc:
            logger.info("result from %s not taken: %s", session.agent_id, exc)
        except Exception:
            logger.exception("result from %s failed", session.agent_id)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _agent_from_proto(hello: agent_pb2.AgentHello) -> AgentInfo:
    if not hello.agent_id:
        raise InvalidTaskError("hello must carry an agent_id")
    if hello.slots < 1:
        raise InvalidTaskError(f"hello offers {hello.slots} slots; at least 1 is needed")
    return AgentInfo(
        agent_id=hello.agent_id,
        gpu_type=hello.gpu_type or "unknown",
        gpu_memory_bytes=hello.gpu_memory_bytes,
        slots=hello.slots,
        workloads=frozenset(hello.workloads),
        version=hello.version,
    )


def _outgoing_to_proto(item: Outgoing) -> agent_pb2.BrokerMessage:
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
        )
    )

"""One connected control stream (``AgentGateway.Connect``): hello, welcome, then messages.

The session sends what the agent tells it to (credits, releases, heartbeats) and hands what
the broker sends (assignments, cancels) to a ``SessionHandler``. It knows nothing of slots or
attempts: that bookkeeping belongs to the ``Agent``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from gpubroker.gpu_agent.convert import (
    assignment_from_proto,
    hello_to_proto,
    ref_from_proto,
    ref_to_proto,
)
from gpubroker.gpu_agent.errors import BrokerProtocolError
from gpubroker.gpu_agent.gateway import ControlCall, GatewayClient
from gpubroker.gpu_agent.model import Assignment, AttemptRef, Hello
from gpubroker.protos import agent_pb2
from gpubroker.protos.transport import CONTROL_PROTOCOL_VERSION

__all__ = ["DEFAULT_HEARTBEAT_S", "Session", "SessionHandler"]

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 5.0
"""Heartbeat interval when the welcome does not name one."""

_CLOSE_GRACE_S = 5.0  # how long a closing session waits for the broker to end the stream
_WELCOME_TIMEOUT_S = 30.0  # a broker that accepts the call but never answers is retried


class SessionHandler(Protocol):
    """What the agent does with the broker's messages on one session."""

    def on_assignment(self, session: Session, assignment: Assignment) -> None:
        """Starts work on an assignment."""

    def on_cancel(self, session: Session, ref: AttemptRef, reason: str) -> None:
        """Stops an attempt the broker revoked."""

    def running(self, session: Session) -> list[AttemptRef]:
        """The attempts of this session still in progress, for the heartbeat."""

    def held_models(self) -> list[str]:
        """Ids of the models held now, most recently used first, for the heartbeat."""


class Session:
    """A welcomed control stream; ``open`` it, ``serve`` it until it ends."""

    def __init__(self, call: ControlCall, outbox: _Outbox, heartbeat_s: float) -> None:
        self._call = call
        self._outbox = outbox
        self.heartbeat_s = heartbeat_s
        self._closing = asyncio.Event()

    @property
    def protocol(self) -> int:
        """The control-stream protocol agreed with the broker (see ``CONTROL_PROTOCOL_VERSION``)."""
        return self._outbox.protocol

    @classmethod
    async def open(cls, gateway: GatewayClient, hello: Hello) -> Session:
        """Says hello and waits for the welcome.

        Raises:
            grpc.aio.AioRpcError: the broker is unreachable or refused the agent.
            BrokerProtocolError: the first reply was not a welcome, or none came in time.
        """
        outbox = _Outbox()
        outbox.put(agent_pb2.AgentMessage(hello=hello_to_proto(hello)))
        call = gateway.connect(outbox.drain())
        try:
            async with asyncio.timeout(_WELCOME_TIMEOUT_S):
                first = await call.read()
        except TimeoutError:
            call.cancel()
            outbox.put(None)
            raise BrokerProtocolError(f"no welcome within {_WELCOME_TIMEOUT_S:g} s") from None
        except BaseException:  # cancelled, or the broker refused or is unreachable
            call.cancel()
            outbox.put(None)
            raise
        if not isinstance(first, agent_pb2.BrokerMessage) or not first.HasField("welcome"):
            call.cancel()
            outbox.put(None)
            got = "the end of the stream" if first is grpc.aio.EOF else str(first).strip()
            raise BrokerProtocolError(f"expected a welcome from the broker, got {got}")
        heartbeat_s = first.welcome.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_S
        outbox.protocol = min(max(first.welcome.protocol, 1), CONTROL_PROTOCOL_VERSION)
        return cls(call, outbox, heartbeat_s)

    def grant(self, slots: int) -> None:
        """Lets the broker assign ``slots`` more tasks."""
        if slots > 0 and not self._closing.is_set():
            self._send(agent_pb2.AgentMessage(credit=agent_pb2.AgentCredit(slots=slots)))

    def release(self, ref: AttemptRef) -> None:
        """Tells the broker a cancelled attempt has stopped."""
        released = agent_pb2.AgentReleased(attempt=ref_to_proto(ref))
        self._send(agent_pb2.AgentMessage(released=released))

    def report(self, result: agent_pb2.AgentResult) -> None:
        """Sends a finished attempt's small outcome on the control stream (protocol 2)."""
        assert self.protocol >= 2, "results go through PutResult on protocol 1"
        self._send(agent_pb2.AgentMessage(result=result))

    def drain(self, reason: str) -> None:
        """Tells the broker this agent is going away and should get no more work."""
        if self.protocol < 2:
            logger.warning("this broker cannot be told the agent is leaving: it will time out")
            return
        self._send(agent_pb2.AgentMessage(draining=agent_pb2.AgentDraining(reason=reason)))

    def close(self) -> None:
        """Half-closes the stream; the broker then ends it (or is cut off after a grace)."""
        if not self._closing.is_set():
            self._closing.set()
            self._outbox.put(None)

    async def serve(self, handler: SessionHandler) -> None:
        """Reads and sends until the stream ends.

        Raises:
            grpc.aio.AioRpcError: the stream broke.
        """
        reader = asyncio.create_task(self._read(handler), name="session-reader")
        heartbeat = asyncio.create_task(self._beat(handler), name="session-heartbeat")
        closing = asyncio.create_task(self._closing.wait(), name="session-closing")
        try:
            await asyncio.wait({reader, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                await asyncio.wait({reader}, timeout=_CLOSE_GRACE_S)
        finally:
            for task in (heartbeat, closing, reader):
                task.cancel()
            await asyncio.wait({heartbeat, closing, reader})
            self._call.cancel()
            # grpc's task that reads our request stream outlives a broken call; ending the
            # stream lets it finish, where it was left pending ("Task was destroyed but it is
            # pending!", then "aclose(): asynchronous generator is already running" at exit).
            self._outbox.put(None)
        if not reader.cancelled():
            reader.result()

    def _send(self, message: agent_pb2.AgentMessage) -> None:
        self._outbox.put(message)

    async def _read(self, handler: SessionHandler) -> None:
        while (message := await self._call.read()) is not grpc.aio.EOF:
            assert isinstance(message, agent_pb2.BrokerMessage)
            if message.WhichOneof("kind") == "batch":
                for inner in message.batch.messages:
                    self._handle(handler, inner)
            else:
                self._handle(handler, message)

    def _handle(self, handler: SessionHandler, message: agent_pb2.BrokerMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "assignment":
            handler.on_assignment(self, assignment_from_proto(message.assignment))
        elif kind == "cancel":
            cancel = message.cancel
            handler.on_cancel(self, ref_from_proto(cancel.attempt), cancel.reason)
        else:
            logger.warning("ignoring an unexpected %s message from the broker", kind)

    async def _beat(self, handler: SessionHandler) -> None:
        while not self._closing.is_set():
            await asyncio.sleep(self.heartbeat_s)
            running = [ref_to_proto(ref) for ref in handler.running(self)]
            heartbeat = agent_pb2.AgentHeartbeat(running=running, models=handler.held_models())
            self._send(agent_pb2.AgentMessage(heartbeat=heartbeat))


MAX_BATCH = 64
"""Most messages sent together on the control stream."""


class _Outbox:
    """What the agent queued for the broker, written in order by ``drain``.

    Unbounded: it holds at most a few credits, releases, results and heartbeats per slot.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self.protocol = 1
        """Set from the welcome: from 2 on, what piles up during a write goes out as one batch."""

    def put(self, message: agent_pb2.AgentMessage | None) -> None:
        """Queues a message; None ends the stream after what is queued before it."""
        self._queue.put_nowait(message)

    async def drain(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        """The request stream of the call."""
        queue = self._queue
        closing = False
        while not closing and (message := await queue.get()) is not None:
            batch = [message]
            while self.protocol >= 2 and not queue.empty() and len(batch) < MAX_BATCH:
                queued = queue.get_nowait()
                if queued is None:
                    closing = True
                    break
                batch.append(queued)
            if len(batch) == 1:
                yield message
            else:
                yield agent_pb2.AgentMessage(batch=agent_pb2.AgentBatch(messages=batch))

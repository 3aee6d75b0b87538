"""A hand-written agent speaking the raw ``AgentGateway`` protocol to a real broker.

No torch and no subprocess: it says hello, grants credit, fetches inputs and puts results when
the test says so, so tests can pin down the protocol (credits, fencing, revocation).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from gpubroker.protos import agent_pb2, agent_pb2_grpc, task_pb2
from tests.support.rpc import bearer, uint8_header

JOIN_TOKEN = "join-me"
"""The join token fake agents present unless told otherwise."""


class FakeAgent:
    """Says hello, grants credit, and collects assignments and cancels."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        agent_id: str,
        slots: int = 1,
        join_token: str = JOIN_TOKEN,
        *,
        gpu_type: str = "cpu",
        gpu_memory: int = 0,
        workloads: Sequence[str] = ("echo",),
        runs_models: bool = False,
        models: Sequence[str] = (),
        beat_s: float | None = None,
        prefetch: int = 0,
    ) -> None:
        self.beat_s = beat_s
        """Send a heartbeat listing ``held`` whenever nothing else went out for this long
        (None: only when the test says, with ``heartbeat``)."""
        self.frozen = False
        """Set by ``freeze``: no heartbeats of its own, as a hung agent whose stream stays open."""
        self.held: set[tuple[str, int]] = set()
        """(task id, attempt) of every assignment read and not yet put."""
        self.stub = agent_pb2_grpc.AgentGatewayStub(channel)
        self.agent_id = agent_id
        self.metadata = bearer(join_token)
        self.outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        hello = agent_pb2.AgentHello(
            agent_id=agent_id,
            gpu_type=gpu_type,
            gpu_memory_bytes=gpu_memory,
            slots=slots,
            workloads=list(workloads),
            runs_models=runs_models,
            models=list(models),
            prefetch=prefetch,
        )
        self.outbox.put_nowait(agent_pb2.AgentMessage(hello=hello))
        self.call = self.stub.Connect(self._messages(), metadata=self.metadata)

    async def _messages(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        while True:
            if self.beat_s is None:
                yield await self.outbox.get()
                continue
            try:
                yield await asyncio.wait_for(self.outbox.get(), self.beat_s)
            except TimeoutError:
                if not self.frozen:
                    yield self._beat()

    def _beat(self) -> agent_pb2.AgentMessage:
        running = [agent_pb2.TaskAttempt(task_id=t, attempt=n) for t, n in sorted(self.held)]
        return agent_pb2.AgentMessage(heartbeat=agent_pb2.AgentHeartbeat(running=running))

    def freeze(self) -> None:
        """Stops its own heartbeats (the stream stays open): the agent looks hung."""
        self.frozen = True

    def thaw(self) -> None:
        """Speaks again: a heartbeat now, and its own heartbeats from then on."""
        self.frozen = False
        self.outbox.put_nowait(self._beat())

    @classmethod
    async def ready(cls, channel: grpc.aio.Channel, agent_id: str, **hello: Any) -> FakeAgent:
        """An agent that was welcomed and granted one slot; ``hello`` as in the constructor."""
        agent = cls(channel, agent_id, **hello)
        await agent.next()
        agent.credit()
        return agent

    def heartbeat(self, models: Sequence[str] = ()) -> None:
        """Sends a heartbeat that reports no running attempt and holds ``models``."""
        beat = agent_pb2.AgentHeartbeat(models=list(models))
        self.outbox.put_nowait(agent_pb2.AgentMessage(heartbeat=beat))

    async def next(self) -> agent_pb2.BrokerMessage:
        """The next message from the broker (fails the test after 10 s)."""
        message = await asyncio.wait_for(self.call.read(), 10)
        assert isinstance(message, agent_pb2.BrokerMessage)
        inner = message.batch.messages if message.WhichOneof("kind") == "batch" else [message]
        for each in inner:
            if each.WhichOneof("kind") == "assignment":
                self.held.add((each.assignment.task_id, each.assignment.attempt))
        return message

    def credit(self, slots: int = 1) -> None:
        """Grants ``slots`` more credit."""
        self.outbox.put_nowait(agent_pb2.AgentMessage(credit=agent_pb2.AgentCredit(slots=slots)))

    async def fetch(self, assignment: agent_pb2.TaskAssignment) -> bytes:
        """The assignment's input bytes, through FetchInputs."""
        attempt = agent_pb2.TaskAttempt(task_id=assignment.task_id, attempt=assignment.attempt)
        request = agent_pb2.FetchInputsRequest(agent_id=self.agent_id, attempt=attempt)
        return b"".join(
            [r.chunk.data async for r in self.stub.FetchInputs(request, metadata=self.metadata)]
        )

    async def put(
        self, assignment: agent_pb2.TaskAssignment, data: bytes, compute_seconds: float = 0.25
    ) -> int:
        """Uploads ``data`` as the attempt's one ``uint8`` output; the task's state after."""
        attempt = agent_pb2.TaskAttempt(task_id=assignment.task_id, attempt=assignment.attempt)
        header = agent_pb2.ResultHeader(
            agent_id=self.agent_id,
            attempt=attempt,
            outputs=[uint8_header(data)],
            compute_seconds=compute_seconds,
        )
        messages = [
            agent_pb2.PutResultRequest(header=header),
            agent_pb2.PutResultRequest(chunk=task_pb2.DataChunk(data=data)),
        ]
        self.held.discard((assignment.task_id, assignment.attempt))
        reply = await self.stub.PutResult(iter(messages), metadata=self.metadata)
        return int(reply.state)

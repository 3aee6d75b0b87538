"""The agent's connection to the broker: control stream, assignments, data calls, reconnects.

The agent dials out (no open port needed on the GPU VM), says hello, grants credit for its free
slots and runs what it is assigned. If the control stream breaks, every in-flight attempt is
considered lost (the broker has requeued it): its result is dropped and the agent reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from client.codec import decode, encode
from client.proto import meta_from_proto, meta_to_proto, params_from_proto
from client.wire import Assembler, iter_chunks
from gpu_agent.config import Settings
from gpu_agent.errors import TaskCancelledError, UnknownWorkloadError, WorkloadArgumentError
from gpu_agent.runner import Runner, RunOutcome
from protos import agent_pb2, agent_pb2_grpc, task_pb2

__all__ = ["CHANNEL_OPTIONS", "Agent"]

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(eq=False)
class _Session:
    """One connected control stream."""

    stub: agent_pb2_grpc.AgentGatewayAsyncStub
    outbox: asyncio.Queue[agent_pb2.AgentMessage | None] = field(default_factory=asyncio.Queue)

    def send(self, **kind: object) -> None:
        self.outbox.put_nowait(agent_pb2.AgentMessage(**kind))  # type: ignore[arg-type]

    async def messages(self) -> AsyncIterator[agent_pb2.AgentMessage]:
        while (message := await self.outbox.get()) is not None:
            yield message


@dataclass(eq=False)
class _Attempt:
    """An assignment being worked on."""

    assignment: agent_pb2.TaskAssignment
    session: _Session
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def ref(self) -> agent_pb2.TaskAttempt:
        return agent_pb2.TaskAttempt(
            task_id=self.assignment.task_id, attempt=self.assignment.attempt
        )


class Agent:
    """Connects to the broker and works until stopped."""

    def __init__(self, settings: Settings, runner: Runner) -> None:
        self._settings = settings
        self._runner = runner
        self._metadata = (
            (("authorization", f"Bearer {settings.join_token}"),) if settings.join_token else ()
        )
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: _Session | None = None
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Connects, reconnecting with backoff, until ``stop`` finishes the in-flight work."""
        delay = self._settings.reconnect_initial_s
        while not self._stopping.is_set():
            try:
                await self._connect()
                delay = self._settings.reconnect_initial_s
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                logger.warning("broker %s unreachable: %s", self._settings.broker_address, exc)
            if self._stopping.is_set():
                break
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, self._settings.reconnect_max_s)
        await self._drain()

    async def stop(self) -> None:
        """Stops taking work; in-flight attempts finish and upload before ``run`` returns."""
        self._stopping.set()
        if not self._attempts and self._session is not None:
            self._session.outbox.put_nowait(None)

    async def _connect(self) -> None:
        async with grpc.aio.insecure_channel(
            self._settings.broker_address, options=CHANNEL_OPTIONS
        ) as channel:
            session = _Session(agent_pb2_grpc.AgentGatewayStub(channel))
            session.send(hello=self._hello())
            call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.BrokerMessage]
            call = session.stub.Connect(session.messages(), metadata=self._metadata)
            first = await call.read()
            if not isinstance(first, agent_pb2.BrokerMessage) or not first.HasField("welcome"):
                raise ConnectionError("the broker did not welcome us")
            logger.info(
                "connected to %s as %s", self._settings.broker_address, self._settings.agent_id
            )
            self._session = session
            self.connected.set()
            heartbeat = asyncio.create_task(self._heartbeat(session, first.welcome))
            try:
                if not self._stopping.is_set():
                    session.send(credit=agent_pb2.AgentCredit(slots=self._free_slots()))
                await self._serve(call, session)
            finally:
                heartbeat.cancel()
                self._lose(session)

    async def _serve(
        self,
        call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.BrokerMessage],
        session: _Session,
    ) -> None:
        while isinstance(message := await call.read(), agent_pb2.BrokerMessage):
            kind = message.WhichOneof("kind")
            if kind == "assignment":
                self._start(_Attempt(message.assignment, session))
            elif kind == "cancel":
                ref = message.cancel.attempt
                attempt = self._attempts.get((ref.task_id, ref.attempt))
                if attempt is not None:
                    logger.info(
                        "cancelling %s#%d: %s", ref.task_id, ref.attempt, message.cancel.reason
                    )
                    attempt.cancelled.set()

    def _lose(self, session: _Session) -> None:
        """The control stream ended: the broker has taken back every attempt it gave us."""
        self.connected.clear()
        if self._session is session:
            self._session = None
        for attempt in self._attempts.values():
            if attempt.session is session:
                attempt.cancelled.set()

    def _hello(self) -> agent_pb2.AgentHello:
        device = self._runner.device
        return agent_pb2.AgentHello(
            agent_id=self._settings.agent_id,
            gpu_type=device.gpu_type,
            gpu_memory_bytes=device.memory_bytes,
            slots=self._settings.slots,
            workloads=sorted(self._runner.workloads),
            version=VERSION,
        )

    def _free_slots(self) -> int:
        return max(self._settings.slots - len(self._attempts), 0)

    async def _heartbeat(self, session: _Session, welcome: agent_pb2.AgentWelcome) -> None:
        interval = welcome.heartbeat_interval_seconds or 5.0
        while True:
            running = [a.ref for a in self._attempts.values() if a.session is session]
            session.send(heartbeat=agent_pb2.AgentHeartbeat(running=running))
            await asyncio.sleep(interval)

    def _start(self, attempt: _Attempt) -> None:
        key = (attempt.assignment.task_id, attempt.assignment.attempt)
        self._attempts[key] = attempt
        task = asyncio.create_task(self._work(key, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _work(self, key: tuple[str, int], attempt: _Attempt) -> None:
        try:
            await self._execute(attempt)
        except TaskCancelledError:
            pass
        except grpc.aio.AioRpcError as exc:
            logger.warning("attempt %s#%d dropped: %s %s", *key, exc.code().name, exc.details())
        except Exception:
            logger.exception("attempt %s#%d crashed", *key)
        finally:
            del self._attempts[key]
            self._finished(attempt)

    def _finished(self, attempt: _Attempt) -> None:
        session = self._session
        if session is None:
            return
        if attempt.cancelled.is_set() and attempt.session is session:
            session.send(released=agent_pb2.AgentReleased(attempt=attempt.ref))
        if self._stopping.is_set():
            if not self._attempts:
                session.outbox.put_nowait(None)
        else:
            session.send(credit=agent_pb2.AgentCredit(slots=1))

    async def _execute(self, attempt: _Attempt) -> None:
        assignment = attempt.assignment
        try:
            inputs = await self._fetch(attempt)
            outcome = await self._run(attempt, inputs)
        except (UnknownWorkloadError, WorkloadArgumentError) as exc:
            await self._report_failure(attempt, "INVALID_ARGUMENT", str(exc))
            return
        except TimeoutError:
            attempt.cancelled.set()
            message = f"ran past its deadline of {assignment.timeout_seconds:.3f}s"
            await self._report_failure(attempt, "DEADLINE_EXCEEDED", message)
            return
        except (TaskCancelledError, grpc.aio.AioRpcError):
            raise
        except Exception as exc:  # the workload's own failure, reported to its owner
            await self._report_failure(attempt, "ABORTED", f"{type(exc).__name__}: {exc}")
            return
        if attempt.cancelled.is_set():
            raise TaskCancelledError(assignment.task_id)
        await self._upload(attempt, outcome)

    async def _fetch(self, attempt: _Attempt) -> list[torch.Tensor]:
        metas = [meta_from_proto(h) for h in attempt.assignment.inputs]
        for meta in metas:
            meta.validate()
        assembler = Assembler(metas)
        if attempt.assignment.inputs_inline:  # small inputs ride along with the assignment
            assembler.feed(attempt.assignment.inline_inputs)
        else:
            request = agent_pb2.FetchInputsRequest(
                agent_id=self._settings.agent_id, attempt=attempt.ref
            )
            replies = attempt.session.stub.FetchInputs(request, metadata=self._metadata)
            async for reply in replies:
                assembler.feed(reply.chunk.data)
        buffers = assembler.finish()
        return [decode(m, b, "torch") for m, b in zip(metas, buffers, strict=True)]  # type: ignore[misc]

    async def _run(self, attempt: _Attempt, inputs: list[torch.Tensor]) -> RunOutcome:
        assignment = attempt.assignment
        params = params_from_proto(assignment.params)
        timeout = assignment.timeout_seconds or None
        run = self._runner.run(assignment.workload, inputs, params, attempt.cancelled)
        return await asyncio.wait_for(run, timeout)

    async def _upload(self, attempt: _Attempt, outcome: RunOutcome) -> None:
        encoded = [encode(t) for t in outcome.outputs]
        header = agent_pb2.ResultHeader(
            agent_id=self._settings.agent_id,
            attempt=attempt.ref,
            outputs=[meta_to_proto(m) for m, _ in encoded],
            compute_seconds=outcome.compute_seconds,
        )

        def requests() -> Iterator[agent_pb2.PutResultRequest]:
            yield agent_pb2.PutResultRequest(header=header)
            for chunk in iter_chunks([d for _, d in encoded]):
                yield agent_pb2.PutResultRequest(chunk=task_pb2.DataChunk(data=chunk))

        await attempt.session.stub.PutResult(requests(), metadata=self._metadata)

    async def _report_failure(self, attempt: _Attempt, code: str, message: str) -> None:
        logger.info(
            "attempt %s#%d failed: %s %s",
            attempt.assignment.task_id,
            attempt.assignment.attempt,
            code,
            message,
        )
        header = agent_pb2.ResultHeader(
            agent_id=self._settings.agent_id,
            attempt=attempt.ref,
            error_code=code,
            error_message=message,
        )
        await attempt.session.stub.PutResult(
            iter([agent_pb2.PutResultRequest(header=header)]), metadata=self._metadata
        )

    async def _drain(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

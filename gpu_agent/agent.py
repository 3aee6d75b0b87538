"""The agent: dials out to the broker, takes assignments, keeps its slots and credits straight.

The agent needs no open port: it connects, says hello, grants one credit per free slot and
runs what it is assigned, each attempt in its own task. A slot's credit goes back to the broker
only once the attempt's work has actually stopped. When the control stream breaks, every
in-flight attempt is lost (the broker requeues it under a new attempt number): its workload is
asked to stop, nothing is uploaded for it, and the agent reconnects with exponential backoff,
granting credit only for the slots that are free by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import grpc

from gpubroker.gpu_agent.attempt import Attempt, ModelServices, Revocation
from gpubroker.gpu_agent.batcher import Batcher
from gpubroker.gpu_agent.config import Settings
from gpubroker.gpu_agent.credit import CreditPolicy
from gpubroker.gpu_agent.errors import BrokerProtocolError, JoinRefusedError
from gpubroker.gpu_agent.gateway import GatewayClient, open_channel
from gpubroker.gpu_agent.model import Assignment, AttemptRef, Hello
from gpubroker.gpu_agent.model_cache import ModelCache
from gpubroker.gpu_agent.runner import Runner
from gpubroker.gpu_agent.session import Session
from gpubroker.gpu_agent.uptime import process_uptime_s

__all__ = ["JOIN_REFUSALS", "Agent", "agent_version"]

logger = logging.getLogger(__name__)

JOIN_REFUSALS = 3
"""Refusals of the join token in a row (UNAUTHENTICATED) after which the agent stops: the token
is fixed for the process's life, so only a broker restarted with another token could change
the answer, and that is not worth retrying forever."""


def agent_version() -> str:
    """The installed ``gpubroker`` version, announced in the hello."""
    try:
        return version("gpubroker")
    except PackageNotFoundError:
        return "0+unknown"


class Agent:
    """Connects to the broker and works until stopped."""

    def __init__(self, settings: Settings, runner: Runner) -> None:
        self._settings = settings
        self._runner = runner
        self._attempts: dict[AttemptRef, Attempt] = {}
        self._tasks: dict[AttemptRef, asyncio.Task[None]] = {}
        self._gateway: GatewayClient | None = None
        self._session: Session | None = None
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._leaving: str | None = None
        self._credit = CreditPolicy(runner.slots, settings.prefetch, settings.prefetch_horizon_s)
        self._outstanding = 0  # credit granted on this session and not yet used
        cache = settings.models
        self.models = ModelCache(
            Path(cache.directory),
            cache.disk_bytes,
            cache.device_bytes or runner.device.memory_bytes // 2,
            runner,
        )
        """Users' models on disk and on the device."""
        self.batcher = Batcher(runner)
        """Stacks model tasks into shared calls."""

    @property
    def agent_id(self) -> str:
        """The id the agent connects with."""
        return self._settings.agent_id

    @property
    def runner(self) -> Runner:
        """Runs the workloads."""
        return self._runner

    @property
    def connected(self) -> bool:
        """True while a control stream to the broker is open."""
        return self._session is not None

    @property
    def attempts_held(self) -> int:
        """Attempts assigned and not yet finished (running, waiting for a slot, uploading)."""
        return len(self._attempts)

    @property
    def free_slots(self) -> int:
        """Room for more attempts: slots plus the current prefetch, less the attempts held
        (work that has not yet stopped counts as held) and the credit not yet used."""
        capacity = self._credit.capacity_for_batch(self._batch_tasks())
        return max(capacity - len(self._attempts) - self._outstanding, 0)

    def _batch_tasks(self) -> int:
        """The largest batch size of the models of the attempts held (0 for none)."""
        sizes = (
            a.assignment.model.max_batch_size for a in self._attempts.values() if a.assignment.model
        )
        return max(sizes, default=0)

    async def run(self) -> None:
        """Connects and serves, reconnecting with backoff, until ``stop`` has drained the work."""
        self._stopped.clear()
        try:
            await asyncio.to_thread(self.models.scan)
            logger.info(
                "model cache %s holds %d model(s)",
                self.models.directory,
                len(self.models.on_disk()),
            )
            async with open_channel(self._settings) as channel:
                self._gateway = GatewayClient(
                    channel, self._settings.agent_id, self._settings.join_token
                )
                try:
                    await self._connect_loop(self._gateway)
                except JoinRefusedError:
                    await self._drain()  # attempts of an earlier session, if any, wind down
                    raise
                await self._drain()
        finally:
            await self.batcher.close()
            await self.models.close()
            self._stopped.set()

    async def stop(self) -> None:
        """Drains: no new credit; in-flight attempts finish and upload; then ``run`` returns.

        When ``run`` is active, waits until it has returned.
        """
        if not self._stopping.is_set():
            logger.info("stopping: finishing %d in-flight attempt(s)", len(self._attempts))
            self._stopping.set()
        if self._session is not None and not self._attempts:
            self._session.close()
        if self._gateway is not None:
            await self._stopped.wait()

    async def leave(self, reason: str) -> None:
        """The machine is going away (a Spot preemption, a host maintenance stop): tells the
        broker at once, so it requeues this agent's work now, then stops like ``stop``."""
        if self._leaving is None:
            logger.warning("%s: telling the broker and taking no more work", reason)
            self._leaving = reason
            if self._session is not None:
                self._session.drain(reason)
        await self.stop()

    # -- SessionHandler -------------------------------------------------------------------------

    def on_assignment(self, session: Session, assignment: Assignment) -> None:
        """Starts an attempt in its own task."""
        ref = assignment.ref
        self._outstanding = max(self._outstanding - 1, 0)
        if ref in self._attempts or self._gateway is None:
            logger.warning("ignoring a second assignment of attempt %s", ref)
            return
        logger.debug("assigned %s: %s", ref, assignment.workload)
        loop = asyncio.get_running_loop()
        deadline = None if assignment.timeout_s is None else loop.time() + assignment.timeout_s
        models = ModelServices(self.models, self.batcher)
        attempt = Attempt(assignment, session, self._gateway, self._runner, deadline, models)
        self._attempts[ref] = attempt
        self._tasks[ref] = asyncio.create_task(self._work(attempt), name=f"work-{ref}")
        batching = assignment.model is not None and assignment.model.max_batch_size > 1
        if batching and not self._stopping.is_set():
            self._top_up(session)  # a batch can use more tasks than the prefetch gives now

    def on_cancel(self, session: Session, ref: AttemptRef, reason: str) -> None:
        """Revokes an attempt; its slot is released once its work has stopped."""
        attempt = self._attempts.get(ref)
        if attempt is None or attempt.session is not session:
            session.release(ref)  # already over: no work holds a slot for it
            return
        logger.info("cancelling %s: %s", ref, reason or "no reason given")
        attempt.revoke(Revocation.CANCELLED)

    def running(self, session: Session) -> list[AttemptRef]:
        """Attempts of ``session`` that still count, for its heartbeat."""
        return [
            a.ref for a in self._attempts.values() if a.session is session and a.revocation is None
        ]

    def held_models(self) -> list[str]:
        """Models on disk or on the device, most recently used first, for the heartbeat."""
        return self.models.held()

    # -- connection -----------------------------------------------------------------------------

    async def _connect_loop(self, gateway: GatewayClient) -> None:
        failures = refusals = 0
        while not self._stopping.is_set():
            try:
                session = await self._open(gateway)
            except JoinRefusedError as exc:
                refusals += 1
                if refusals >= JOIN_REFUSALS:
                    logger.error("%s", exc)
                    raise
                logger.warning("%s; trying again", str(exc).removesuffix("; not retrying"))
                session = None
            if session is None:
                failures += 1
            else:
                refusals = 0
                await self._serve(session)
                failures = 1  # a lost session is retried after the shortest delay
            if not self._stopping.is_set():
                await self._pause(self._settings.backoff.delay_s(failures))

    async def _open(self, gateway: GatewayClient) -> Session | None:
        address = self._settings.broker_address
        try:
            session = await Session.open(gateway, self._hello())
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise _refused(address, exc) from None  # counted by _connect_loop
            logger.warning("cannot connect to %s: %s %s", address, exc.code().name, exc.details())
            return None
        except BrokerProtocolError as exc:
            logger.warning("broker %s: %s", address, exc)
            return None
        logger.info("connected to %s as %s", address, self._settings.agent_id)
        return session

    async def _serve(self, session: Session) -> None:
        self._session = session
        if self._leaving is not None:
            session.drain(self._leaving)
        self._outstanding = 0  # the broker forgot the old session's credit
        if not self._stopping.is_set():
            self._top_up(session)
        elif not self._attempts:
            session.close()
        try:
            await session.serve(self)
            logger.info("the broker ended the control stream")
        except grpc.aio.AioRpcError as exc:
            logger.warning("control stream broke: %s %s", exc.code().name, exc.details())
        finally:
            self._session = None
            self._lose(session)

    def _lose(self, session: Session) -> None:
        lost = [a for a in self._attempts.values() if a.session is session]
        for attempt in lost:
            attempt.revoke(Revocation.LOST)
        if lost:
            logger.warning("lost %d in-flight attempt(s) with the control stream", len(lost))

    async def _pause(self, delay_s: float) -> None:
        logger.debug("reconnecting in %.3f s", delay_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._stopping.wait()

    def _hello(self) -> Hello:
        device = self._runner.device
        return Hello(
            agent_id=self._settings.agent_id,
            gpu_type=device.gpu_type,
            gpu_memory_bytes=device.memory_bytes,
            slots=self._runner.slots,
            workloads=tuple(sorted(self._runner.workloads)),
            version=agent_version(),
            prefetch=self._settings.prefetch,
            runs_models=True,
            models=tuple(self.models.on_disk()),
            uptime_s=process_uptime_s(),
            broken=tuple(sorted(self._runner.broken.items())),
        )

    # -- attempts -------------------------------------------------------------------------------

    async def _work(self, attempt: Attempt) -> None:
        try:
            await attempt.execute()
        finally:
            del self._attempts[attempt.ref]
            del self._tasks[attempt.ref]
            self._free_slot(attempt)

    def _free_slot(self, attempt: Attempt) -> None:
        session = self._session
        if session is None:
            return  # the next session's first credit counts this slot
        if attempt.session is session and attempt.revocation is Revocation.CANCELLED:
            session.release(attempt.ref)
        if attempt.compute_seconds is not None:
            self._credit.observe(attempt.compute_seconds)
        if not self._stopping.is_set():
            self._top_up(session)
        elif not self._attempts:
            session.close()

    def _top_up(self, session: Session) -> None:
        """Grants the broker credit up to the room there is now."""
        room = self.free_slots
        if room > 0:
            session.grant(room)
            self._outstanding += room

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))


def _refused(address: str, exc: grpc.aio.AioRpcError) -> JoinRefusedError:
    """The error for a broker that refused the join token: retrying with it cannot help."""
    return JoinRefusedError(
        f"the broker at {address} refused this agent: UNAUTHENTICATED "
        f"{exc.details() or ''}: give it the broker's GPUBROKER_JOIN_TOKEN as --join-token or "
        "GPUBROKER_AGENT_JOIN_TOKEN; not retrying"
    )

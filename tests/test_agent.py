"""The real ``Agent`` against a hand-written fake ``AgentGateway`` on a loopback port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from click.testing import CliRunner

from gpubroker.client.codec import decode, encode
from gpubroker.gpu_agent.__main__ import main
from gpubroker.gpu_agent.agent import Agent
from gpubroker.gpu_agent.config import Backoff, Settings
from gpubroker.gpu_agent.runner import Runner, detect_device
from gpubroker.gpu_agent.workloads import Param, Workload, WorkloadContext, registry
from gpubroker.protos import agent_pb2, agent_pb2_grpc, task_pb2
from gpubroker.protos.wire import TensorMeta, iter_chunks

Context = grpc.aio.ServicerContext[Any, Any]
TOKEN = "s3cret"
WAIT_S = 10.0


@dataclass
class Upload:
    """One result (a PutResult call or a control-stream result) as the fake broker saw it."""

    header: agent_pb2.ResultHeader
    data: bytes


@dataclass
class FakeGateway(agent_pb2_grpc.AgentGatewayServicer):
    """Welcomes agents, assigns queued tasks against their credit, serves inputs, keeps results."""

    heartbeat_s: float = 0.05
    refuse_results: grpc.StatusCode | None = None
    messages: asyncio.Queue[agent_pb2.AgentMessage] = field(default_factory=asyncio.Queue)
    uploads: asyncio.Queue[Upload] = field(default_factory=asyncio.Queue)
    fetched: list[str] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    _queued: list[agent_pb2.TaskAssignment] = field(default_factory=list)
    _inputs: dict[str, bytes] = field(default_factory=dict)
    _outbox: asyncio.Queue[agent_pb2.BrokerMessage | None] | None = None
    _credit: int = 0

    def submit(self, assignment: agent_pb2.TaskAssignment, data: bytes = b"") -> None:
        self._queued.append(assignment)
        self._inputs[assignment.task_id] = data
        self._dispatch()

    def cancel(self, task_id: str, attempt: int) -> None:
        assert self._outbox is not None
        ref = agent_pb2.TaskAttempt(task_id=task_id, attempt=attempt)
        self._outbox.put_nowait(
            agent_pb2.BrokerMessage(cancel=agent_pb2.TaskCancel(attempt=ref, reason="test"))
        )

    def _dispatch(self) -> None:
        while self._outbox is not None and self._credit > 0 and self._queued:
            self._credit -= 1
            self._outbox.put_nowait(agent_pb2.BrokerMessage(assignment=self._queued.pop(0)))

    async def Connect(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: Context
    ) -> AsyncIterator[agent_pb2.BrokerMessage]:
        self.metadata.append(dict(context.invocation_metadata() or ()))  # type: ignore[arg-type]
        messages = aiter(request_iterator)
        hello = await anext(messages)
        self.messages.put_nowait(hello)
        outbox = self._outbox = asyncio.Queue()
        self._credit = 0
        reader = asyncio.create_task(self._read(messages, outbox))
        try:
            welcome = agent_pb2.AgentWelcome(
                agent_id=hello.hello.agent_id, heartbeat_interval_seconds=self.heartbeat_s
            )
            yield agent_pb2.BrokerMessage(welcome=welcome)
            while (message := await outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()

    async def _read(
        self,
        messages: AsyncIterator[agent_pb2.AgentMessage],
        outbox: asyncio.Queue[agent_pb2.BrokerMessage | None],
    ) -> None:
        async for received in messages:
            batch = received.batch.messages if received.HasField("batch") else [received]
            for message in batch:
                self.messages.put_nowait(message)
                if message.HasField("result"):  # a small result, on the control stream
                    self.uploads.put_nowait(Upload(message.result.header, message.result.data))
                self._credit += message.credit.slots
            self._dispatch()
        outbox.put_nowait(None)  # the agent half-closed: end the stream, as the broker does

    async def FetchInputs(
        self, request: agent_pb2.FetchInputsRequest, context: Context
    ) -> AsyncIterator[agent_pb2.FetchInputsResponse]:
        self.fetched.append(request.attempt.task_id)
        for chunk in iter_chunks([self._inputs[request.attempt.task_id]], chunk_bytes=100):
            yield agent_pb2.FetchInputsResponse(chunk=task_pb2.DataChunk(data=chunk))

    async def PutResult(
        self, request_iterator: AsyncIterator[agent_pb2.PutResultRequest], context: Context
    ) -> agent_pb2.PutResultResponse:
        requests = [r async for r in request_iterator]
        if self.refuse_results is not None:
            await context.abort(self.refuse_results, "attempt 1 is no longer current")
        self.uploads.put_nowait(
            Upload(requests[0].header, b"".join(r.chunk.data for r in requests))
        )
        return agent_pb2.PutResultResponse(state=task_pb2.TASK_STATE_SUCCEEDED)


@dataclass
class Broker:
    """A fake gateway served on a loopback port that can be stopped and started again."""

    gateway: FakeGateway
    port: int = 0
    server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.server = grpc.aio.server()
        agent_pb2_grpc.add_AgentGatewayServicer_to_server(self.gateway, self.server)
        self.port = self.server.add_insecure_port(f"localhost:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)


class Gate:
    """A workload that waits until the test opens it; records how it ended."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        self.entered.set()
        self.opened.wait(WAIT_S)
        return list(inputs)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    server = Broker(FakeGateway())
    await server.start()
    yield server
    await server.stop()


AgentFactory = Callable[..., Agent]


@pytest.fixture
async def start_agent(broker: Broker) -> AsyncIterator[AgentFactory]:
    started: list[tuple[Agent, Runner, asyncio.Task[None]]] = []

    def start(
        slots: int = 2, extra: Mapping[str, Workload] | None = None, prefetch: int = 0
    ) -> Agent:
        settings = Settings(
            broker_address=f"localhost:{broker.port}",
            agent_id="agent-under-test",
            slots=slots,
            prefetch=prefetch,
            device="cpu",
            join_token=TOKEN,
            backoff=Backoff(initial_s=0.02, max_s=0.2),
        )
        runner = Runner(detect_device("cpu"), slots, {**registry(), **(extra or {})})
        agent = Agent(settings, runner)
        started.append((agent, runner, asyncio.create_task(agent.run())))
        return agent

    yield start
    for agent, runner, task in started:
        await asyncio.wait_for(agent.stop(), WAIT_S)
        await task
        runner.close()


def _assignment(
    task_id: str,
    workload: str,
    inputs: Sequence[torch.Tensor] = (),
    attempt: int = 1,
    timeout_s: float = 0.0,
    params: Mapping[str, Param] | None = None,
) -> tuple[agent_pb2.TaskAssignment, bytes]:
    encoded = [encode(t, name=f"in{i}") for i, t in enumerate(inputs)]
    headers = [_header(meta) for meta, _ in encoded]
    assignment = agent_pb2.TaskAssignment(
        task_id=task_id,
        attempt=attempt,
        workload=workload,
        inputs=headers,
        params={k: _param(v) for k, v in (params or {}).items()},
        timeout_seconds=timeout_s,
    )
    return assignment, b"".join(iter_chunks([data for _, data in encoded]))


def _header(meta: TensorMeta) -> task_pb2.TensorHeader:
    return task_pb2.TensorHeader(
        name=meta.name, dtype=meta.dtype, shape=meta.shape, nbytes=meta.nbytes, crc32c=meta.crc32c
    )


def _param(value: Param) -> task_pb2.ParamValue:
    if isinstance(value, bool):
        return task_pb2.ParamValue(bool_value=value)
    if isinstance(value, int):
        return task_pb2.ParamValue(int_value=value)
    if isinstance(value, float):
        return task_pb2.ParamValue(float_value=value)
    return task_pb2.ParamValue(string_value=value)


def _outputs(upload: Upload) -> list[torch.Tensor]:
    tensors, offset = [], 0
    for header in upload.header.outputs:
        meta = TensorMeta(header.dtype, tuple(header.shape), header.nbytes, header.crc32c)
        buffer = bytearray(upload.data[offset : offset + meta.nbytes])
        offset += meta.nbytes
        tensor = decode(meta, buffer, "torch")
        assert isinstance(tensor, torch.Tensor)
        tensors.append(tensor)
    assert offset == len(upload.data)
    return tensors


async def _next(gateway: FakeGateway, kind: str) -> agent_pb2.AgentMessage:
    """The next control message of ``kind``; others (heartbeats, mostly) are skipped."""
    async with asyncio.timeout(WAIT_S):
        while (message := await gateway.messages.get()).WhichOneof("kind") != kind:
            pass
    return message


def _received_kinds(gateway: FakeGateway) -> list[str | None]:
    """The kinds of the control messages received and not yet looked at."""
    kinds: list[str | None] = []
    while not gateway.messages.empty():
        kinds.append(gateway.messages.get_nowait().WhichOneof("kind"))
    return kinds


async def _upload(gateway: FakeGateway) -> Upload:
    return await asyncio.wait_for(gateway.uploads.get(), WAIT_S)


async def _wait_for(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)


# -- tests ----------------------------------------------------------------------------------------


async def test_the_agent_says_hello_with_its_workloads_and_grants_a_credit_per_slot(
    broker: Broker, start_agent: AgentFactory
) -> None:
    start_agent(slots=3)

    hello = (await _next(broker.gateway, "hello")).hello
    credit = (await _next(broker.gateway, "credit")).credit

    assert hello.agent_id == "agent-under-test"
    assert hello.gpu_type == "cpu" and hello.gpu_memory_bytes > 0
    assert hello.slots == 3
    assert {"matmul", "echo", "sleep", "linalg.solve"} <= set(hello.workloads)
    assert hello.version
    assert credit.slots == 3
    assert broker.gateway.metadata[0]["authorization"] == f"Bearer {TOKEN}"


async def test_prefetch_takes_tasks_beyond_the_slots_and_runs_them_as_slots_free_up(
    broker: Broker, start_agent: AgentFactory
) -> None:
    gate = Gate()
    start_agent(slots=1, extra={"gate": gate}, prefetch=2)
    hello = (await _next(broker.gateway, "hello")).hello
    credit = (await _next(broker.gateway, "credit")).credit
    # Before any task time is known the prefetch is one per slot (at most the maximum, 2).
    assert (hello.slots, hello.prefetch, credit.slots) == (1, 2, 2)

    broker.gateway.submit(*_assignment("t-gate", "gate"))
    await asyncio.to_thread(gate.entered.wait, WAIT_S)
    # Submitted once the gate holds the one slot: attempts start as their inputs arrive, so
    # two fetched side by side could start in either order.
    broker.gateway.submit(*_assignment("t-1", "echo", [torch.ones(1)]))
    await asyncio.sleep(0.3)
    assert broker.gateway.uploads.empty()  # the one slot is busy: t-1 waits here

    gate.opened.set()
    done = [(await _upload(broker.gateway)).header.attempt.task_id for _ in range(2)]
    assert done == ["t-gate", "t-1"]


async def test_a_matmul_result_is_bit_exact_and_its_compute_time_is_measured(
    broker: Broker, start_agent: AgentFactory
) -> None:
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    start_agent()

    broker.gateway.submit(*_assignment("t-1", "matmul", [a, b]))
    upload = await _upload(broker.gateway)

    assert upload.header.agent_id == "agent-under-test"
    assert (upload.header.attempt.task_id, upload.header.attempt.attempt) == ("t-1", 1)
    assert upload.header.error_code == ""
    assert upload.header.compute_seconds > 0
    (result,) = _outputs(upload)
    assert result.view(torch.uint8).equal((a @ b).view(torch.uint8))
    assert broker.gateway.fetched == ["t-1"]
    assert (await _next(broker.gateway, "credit")).credit.slots == 2  # the first grant
    assert (await _next(broker.gateway, "credit")).credit.slots == 1  # the slot came back


async def test_inline_inputs_are_used_without_a_fetch(
    broker: Broker, start_agent: AgentFactory
) -> None:
    x = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    assignment, data = _assignment("t-inline", "echo", [x])
    assignment.inline_inputs, assignment.inputs_inline = data, True
    start_agent()

    broker.gateway.submit(assignment)
    (result,) = _outputs(await _upload(broker.gateway))

    assert torch.equal(result, x)
    assert broker.gateway.fetched == []


@pytest.mark.parametrize(
    ("workload", "inputs", "params", "code", "message"),
    [
        ("nope", [], {}, "INVALID_ARGUMENT", "unknown workload 'nope'"),
        ("matmul", [torch.ones(2, 3)] * 2, {}, "INVALID_ARGUMENT", "has 3 columns but b"),
        ("sum", [torch.ones(2)], {"axis": 1}, "INVALID_ARGUMENT", "unknown parameter"),
        ("boom", [], {}, "ABORTED", "RuntimeError: kaput"),
    ],
    ids=["unknown-workload", "bad-shapes", "bad-param", "workload-raised"],
)
async def test_a_failed_attempt_is_reported_with_its_status_code_and_no_outputs(
    broker: Broker,
    start_agent: AgentFactory,
    workload: str,
    inputs: list[torch.Tensor],
    params: dict[str, Param],
    code: str,
    message: str,
) -> None:
    start_agent(extra={"boom": _raising(RuntimeError("kaput"))})

    broker.gateway.submit(*_assignment("t-bad", workload, inputs, params=params))
    upload = await _upload(broker.gateway)

    assert upload.header.error_code == code
    assert message in upload.header.error_message
    assert not upload.header.outputs and upload.data == b""


def _raising(exc: Exception) -> Workload:
    def workload(
        inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        raise exc

    return workload


async def test_a_task_past_its_timeout_is_reported_as_deadline_exceeded(
    broker: Broker, start_agent: AgentFactory
) -> None:
    start_agent()
    started = time.monotonic()

    broker.gateway.submit(*_assignment("t-slow", "sleep", timeout_s=0.2, params={"seconds": 30.0}))
    upload = await _upload(broker.gateway)

    assert upload.header.error_code == "DEADLINE_EXCEEDED"
    assert "0.200 s" in upload.header.error_message
    assert time.monotonic() - started < 2


async def test_a_cancelled_sleep_is_released_and_never_uploaded(
    broker: Broker, start_agent: AgentFactory
) -> None:
    start_agent(slots=1)
    await _next(broker.gateway, "credit")
    broker.gateway.submit(
        *_assignment("t-sleep", "sleep", [torch.ones(1)], attempt=4, params={"seconds": 30.0})
    )
    await _wait_for(lambda: "t-sleep" in broker.gateway.fetched)

    broker.gateway.cancel("t-sleep", 4)
    released = (await _next(broker.gateway, "released")).released
    credit = (await _next(broker.gateway, "credit")).credit

    assert (released.attempt.task_id, released.attempt.attempt) == ("t-sleep", 4)
    assert credit.slots == 1
    assert broker.gateway.uploads.empty()


async def test_heartbeats_list_the_running_attempts(
    broker: Broker, start_agent: AgentFactory
) -> None:
    gate = Gate()
    start_agent(extra={"gate": gate})
    broker.gateway.submit(*_assignment("t-gate", "gate", attempt=2))
    await asyncio.to_thread(gate.entered.wait, WAIT_S)

    heartbeat = (await _next(broker.gateway, "heartbeat")).heartbeat
    gate.opened.set()

    assert [(a.task_id, a.attempt) for a in heartbeat.running] == [("t-gate", 2)]
    await _upload(broker.gateway)


@pytest.mark.parametrize("code", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND])
async def test_a_refused_stale_result_does_not_stop_the_agent(
    broker: Broker, start_agent: AgentFactory, code: grpc.StatusCode
) -> None:
    broker.gateway.refuse_results = code
    agent = start_agent(slots=1)
    await _next(broker.gateway, "credit")

    # 128 KiB of output: too large for the control stream, so it goes through PutResult.
    broker.gateway.submit(*_assignment("t-stale", "echo", [torch.ones(32 << 10)]))
    credit = await _next(broker.gateway, "credit")
    broker.gateway.refuse_results = None
    broker.gateway.submit(*_assignment("t-next", "echo", [torch.full((2,), 7.0)]))
    upload = await _upload(broker.gateway)

    assert credit.credit.slots == 1
    assert upload.header.attempt.task_id == "t-next"
    assert torch.equal(_outputs(upload)[0], torch.full((2,), 7.0))
    assert agent.is_connected


async def test_the_agent_reconnects_after_the_broker_restarts_and_drops_lost_work(
    broker: Broker, start_agent: AgentFactory
) -> None:
    gate = Gate()  # ignores the cancel, so the lost attempt keeps its slot until opened
    agent = start_agent(slots=2, extra={"gate": gate})
    await _next(broker.gateway, "credit")
    broker.gateway.submit(*_assignment("t-lost", "gate"))
    await asyncio.to_thread(gate.entered.wait, WAIT_S)

    await broker.stop()
    await _wait_for(lambda: not agent.is_connected)
    await broker.start()
    hello = await _next(broker.gateway, "hello")
    first_credit = await _next(broker.gateway, "credit")
    gate.opened.set()
    freed_credit = await _next(broker.gateway, "credit")
    broker.gateway.submit(*_assignment("t-after", "echo", [torch.ones(3)]))
    upload = await _upload(broker.gateway)

    assert hello.hello.agent_id == "agent-under-test"
    assert first_credit.credit.slots == 1  # the slot still running lost work is not offered
    assert freed_credit.credit.slots == 1  # until that work has stopped
    assert upload.header.attempt.task_id == "t-after"
    assert broker.gateway.uploads.empty()  # nothing was uploaded for the lost attempt


async def test_a_deadline_is_reported_at_once_but_the_slot_waits_for_the_work_to_stop(
    broker: Broker, start_agent: AgentFactory
) -> None:
    gate = Gate()
    start_agent(slots=1, extra={"gate": gate})
    await _next(broker.gateway, "credit")

    broker.gateway.submit(*_assignment("t-stuck", "gate", timeout_s=0.1))
    upload = await _upload(broker.gateway)
    await asyncio.sleep(0.2)
    sent_while_stuck = _received_kinds(broker.gateway)
    gate.opened.set()
    credit = await _next(broker.gateway, "credit")

    assert upload.header.error_code == "DEADLINE_EXCEEDED"
    assert "credit" not in sent_while_stuck
    assert credit.credit.slots == 1


async def test_stop_finishes_in_flight_work_uploads_it_and_grants_no_more_credit(
    broker: Broker, start_agent: AgentFactory
) -> None:
    agent = start_agent(slots=1)
    await _next(broker.gateway, "credit")
    broker.gateway.submit(
        *_assignment("t-drain", "sleep", [torch.ones(2)], params={"seconds": 0.3})
    )
    await _wait_for(lambda: "t-drain" in broker.gateway.fetched)

    await asyncio.wait_for(agent.stop(), WAIT_S)

    upload = await _upload(broker.gateway)
    assert upload.header.attempt.task_id == "t-drain" and upload.header.error_code == ""
    assert upload.header.compute_seconds >= 0.3
    assert "credit" not in _received_kinds(broker.gateway)
    assert not agent.is_connected


async def test_stop_while_the_broker_is_unreachable_returns_promptly(
    broker: Broker, start_agent: AgentFactory
) -> None:
    await broker.stop()
    agent = start_agent()
    await asyncio.sleep(0.3)  # a few failed connects and backoff pauses

    await asyncio.wait_for(agent.stop(), 2.0)

    assert not agent.is_connected


# -- the process: settings, flags and signals -----------------------------------------------------


def test_settings_come_from_gpubroker_agent_variables() -> None:
    settings = Settings.from_env(
        {
            "GPUBROKER_AGENT_BROKER": "broker.internal:443",
            "GPUBROKER_AGENT_ID": "vm-7",
            "GPUBROKER_AGENT_SLOTS": "4",
            "GPUBROKER_AGENT_DEVICE": "cuda",
            "GPUBROKER_AGENT_JOIN_TOKEN": "tok",
            "GPUBROKER_AGENT_TLS": "true",
            "GPUBROKER_AGENT_CA_FILE": "/etc/ca.pem",
            "GPUBROKER_AGENT_RECONNECT_MAX_S": "9",
        }
    )

    assert settings == Settings(
        broker_address="broker.internal:443",
        agent_id="vm-7",
        slots=4,
        device="cuda",
        join_token="tok",
        tls=True,
        ca_file="/etc/ca.pem",
        backoff=Backoff(max_s=9.0),
    )


def test_unset_variables_keep_the_defaults_and_the_id_is_the_hostname_plus_a_suffix() -> None:
    settings = Settings.from_env({"GPUBROKER_JOIN_TOKEN": "shared"})

    assert settings.slots == 2 and settings.device == "auto" and not settings.tls
    assert settings.join_token == "shared"
    assert settings.agent_id.startswith(socket.gethostname() + "-")
    assert Settings.from_env({}).agent_id != settings.agent_id


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"GPUBROKER_AGENT_SLOTS": "two"}, "GPUBROKER_AGENT_SLOTS must be an integer, got 'two'"),
        ({"GPUBROKER_AGENT_SLOTS": "0"}, "slots must be at least 1, got 0"),
        ({"GPUBROKER_AGENT_DEVICE": "tpu"}, "device must be one of auto, cpu, cuda, not 'tpu'"),
        ({"GPUBROKER_AGENT_TLS": "maybe"}, "GPUBROKER_AGENT_TLS must be true or false"),
    ],
)
def test_bad_variables_are_refused_by_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(environ)


def test_flags_override_the_environment_and_absent_flags_do_not() -> None:
    settings = Settings.from_env({"GPUBROKER_AGENT_SLOTS": "4", "GPUBROKER_AGENT_ID": "env-id"})

    overridden = settings.with_overrides(slots=1, agent_id=None, device="cpu")

    assert (overridden.slots, overridden.agent_id, overridden.device) == (1, "env-id", "cpu")


def test_reconnect_delays_double_from_0_1_s_to_a_5_s_cap_with_jitter() -> None:
    backoff = Backoff()
    middle: Callable[[float, float], float] = lambda low, high: (low + high) / 2  # noqa: E731

    delays = [backoff.delay_s(n, middle) for n in range(1, 10)]

    assert delays[:3] == pytest.approx([0.1, 0.2, 0.4])
    assert delays[-1] == pytest.approx(5.0)
    assert backoff.delay_s(1, lambda low, high: low) == pytest.approx(0.08)
    assert backoff.delay_s(50, lambda low, high: high) == pytest.approx(6.0)


def test_the_cli_refuses_a_bad_flag_before_connecting() -> None:
    result = CliRunner().invoke(main, ["--broker", "localhost:1", "--slots", "0"])

    assert result.exit_code == 2
    assert "--slots" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_the_cli_exits_1_when_cuda_is_asked_for_and_absent() -> None:
    result = CliRunner().invoke(main, ["--broker", "localhost:1", "--device", "cuda"])

    assert result.exit_code == 1
    assert "no CUDA device" in result.output


async def _spawn_agent(port: int, log: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUBROKER_")}
    args = ["--broker", f"localhost:{port}", "--slots", "1", "--device", "cpu"]
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpubroker.gpu_agent", *args,
            "--agent-id", "cli", "--join-token", TOKEN,
            stdout=out, stderr=out, env=env,
        )  # fmt: skip


@pytest.mark.slow
async def test_sigterm_drains_in_flight_work_then_exits_0(broker: Broker, tmp_path: Path) -> None:
    broker.gateway.submit(*_assignment("t-term", "sleep", [torch.ones(1)], params={"seconds": 0.3}))
    process = await _spawn_agent(broker.port, tmp_path / "agent.log")
    await _wait_for(lambda: "t-term" in broker.gateway.fetched)

    process.send_signal(signal.SIGTERM)
    upload = await _upload(broker.gateway)
    code = await asyncio.wait_for(process.wait(), WAIT_S)

    assert upload.header.error_code == "" and upload.header.attempt.task_id == "t-term"
    assert code == 0, (tmp_path / "agent.log").read_text()


@pytest.mark.slow
async def test_a_second_signal_exits_at_once(broker: Broker, tmp_path: Path) -> None:
    broker.gateway.submit(
        *_assignment("t-long", "sleep", [torch.ones(1)], params={"seconds": 60.0})
    )
    process = await _spawn_agent(broker.port, tmp_path / "agent.log")
    await _wait_for(lambda: "t-long" in broker.gateway.fetched)

    process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    process.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(process.wait(), WAIT_S)

    assert code == 128 + signal.SIGINT, (tmp_path / "agent.log").read_text()
    assert broker.gateway.uploads.empty()

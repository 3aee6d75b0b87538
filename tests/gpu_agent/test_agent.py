"""The real ``Agent`` against a hand-written fake ``AgentGateway`` on a loopback port."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence

import grpc
import pytest
import torch

from gpubroker.gpu_agent.attempt import retry_after_s
from gpubroker.gpu_agent.workloads import Param, Workload, WorkloadContext
from gpubroker.protos.transport import RETRY_AFTER_HEADER
from tests.fakes.gateway import (
    TOKEN,
    WAIT_S,
    AgentFactory,
    FakeGatewayServer,
    make_assignment,
    next_message,
    next_upload,
    outputs,
    received_kinds,
)
from tests.support.waiting import wait_for


class Gate:
    """A workload that waits until the test opens it; records how it ended."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self.cancelled = threading.Event()
        """The attempt's own ``WorkloadContext.cancelled``, once it runs."""

    def __call__(
        self, inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        self.cancelled = ctx.cancelled
        self.entered.set()
        self.opened.wait(WAIT_S)
        return list(inputs)


def _raising(exc: Exception) -> Workload:
    def workload(
        inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        raise exc

    return workload


# -- the protocol --------------------------------------------------------------------------


async def test_the_agent_says_hello_with_its_workloads_and_grants_a_credit_per_slot(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    start_agent(slots=3)

    hello = (await next_message(broker.gateway, "hello")).hello
    credit = (await next_message(broker.gateway, "credit")).credit

    assert hello.agent_id == "agent-under-test"
    assert hello.gpu_type == "cpu" and hello.gpu_memory_bytes > 0
    assert hello.slots == 3
    assert {"matmul", "echo", "sleep", "linalg.solve"} <= set(hello.workloads)
    assert hello.version
    assert hello.uptime_seconds > 0  # since this test process started
    assert credit.slots == 3
    assert broker.gateway.metadata[0]["authorization"] == f"Bearer {TOKEN}"


async def test_prefetch_takes_tasks_beyond_the_slots_and_runs_them_as_slots_free_up(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    gate = Gate()
    start_agent(slots=1, extra={"gate": gate}, prefetch=2)
    hello = (await next_message(broker.gateway, "hello")).hello
    credit = (await next_message(broker.gateway, "credit")).credit
    # Before any task time is known the prefetch is one per slot (at most the maximum, 2).
    assert (hello.slots, hello.prefetch, credit.slots) == (1, 2, 2)

    broker.gateway.submit(*make_assignment("t-gate", "gate"))
    await asyncio.to_thread(gate.entered.wait, WAIT_S)
    # Submitted once the gate holds the one slot: attempts start as their inputs arrive, so
    # two fetched side by side could start in either order.
    broker.gateway.submit(*make_assignment("t-1", "echo", [torch.ones(1)]))
    await wait_for(lambda: "t-1" in broker.gateway.fetched, WAIT_S, "t-1 to be prefetched")
    await asyncio.sleep(0.3)  # a quiet window: t-1 must not run while the gate holds the slot
    assert broker.gateway.uploads.empty()  # the one slot is busy: t-1 waits here

    gate.opened.set()
    done = [(await next_upload(broker.gateway)).header.attempt.task_id for _ in range(2)]
    assert done == ["t-gate", "t-1"]


async def test_a_matmul_result_is_bit_exact_and_its_compute_time_is_measured(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    start_agent()

    broker.gateway.submit(*make_assignment("t-1", "matmul", [a, b]))
    upload = await next_upload(broker.gateway)

    assert upload.header.agent_id == "agent-under-test"
    assert (upload.header.attempt.task_id, upload.header.attempt.attempt) == ("t-1", 1)
    assert upload.header.error_code == ""
    assert upload.header.compute_seconds > 0
    (result,) = outputs(upload)
    assert result.view(torch.uint8).equal((a @ b).view(torch.uint8))
    assert broker.gateway.fetched == ["t-1"]
    assert (await next_message(broker.gateway, "credit")).credit.slots == 2  # the first grant
    assert (await next_message(broker.gateway, "credit")).credit.slots == 1  # the slot came back


async def test_inline_inputs_are_used_without_a_fetch(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    x = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    assignment, data = make_assignment("t-inline", "echo", [x])
    assignment.inline_inputs, assignment.inputs_inline = data, True
    start_agent()

    broker.gateway.submit(assignment)
    (result,) = outputs(await next_upload(broker.gateway))

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
    broker: FakeGatewayServer,
    start_agent: AgentFactory,
    workload: str,
    inputs: list[torch.Tensor],
    params: dict[str, Param],
    code: str,
    message: str,
) -> None:
    start_agent(extra={"boom": _raising(RuntimeError("kaput"))})

    broker.gateway.submit(*make_assignment("t-bad", workload, inputs, params=params))
    upload = await next_upload(broker.gateway)

    assert upload.header.error_code == code
    assert message in upload.header.error_message
    assert not upload.header.outputs and upload.data == b""


async def test_a_task_past_its_timeout_is_reported_as_deadline_exceeded(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    start_agent()
    started = time.monotonic()

    broker.gateway.submit(
        *make_assignment("t-slow", "sleep", timeout_s=0.2, params={"seconds": 30.0})
    )
    upload = await next_upload(broker.gateway)

    assert upload.header.error_code == "DEADLINE_EXCEEDED"
    assert "0.200 s" in upload.header.error_message
    assert time.monotonic() - started < 2


async def test_a_cancelled_sleep_is_released_and_never_uploaded(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    start_agent(slots=1)
    await next_message(broker.gateway, "credit")
    broker.gateway.submit(
        *make_assignment("t-sleep", "sleep", [torch.ones(1)], attempt=4, params={"seconds": 30.0})
    )
    await wait_for(lambda: "t-sleep" in broker.gateway.fetched)

    broker.gateway.cancel("t-sleep", 4)
    released = (await next_message(broker.gateway, "released")).released
    credit = (await next_message(broker.gateway, "credit")).credit

    assert (released.attempt.task_id, released.attempt.attempt) == ("t-sleep", 4)
    assert credit.slots == 1
    assert broker.gateway.uploads.empty()


async def test_heartbeats_list_the_running_attempts(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    gate = Gate()
    start_agent(extra={"gate": gate})
    broker.gateway.submit(*make_assignment("t-gate", "gate", attempt=2))
    await asyncio.to_thread(gate.entered.wait, WAIT_S)

    heartbeat = (await next_message(broker.gateway, "heartbeat")).heartbeat
    gate.opened.set()

    assert [(a.task_id, a.attempt) for a in heartbeat.running] == [("t-gate", 2)]
    await next_upload(broker.gateway)


@pytest.mark.parametrize("code", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND])
async def test_a_refused_stale_result_does_not_stop_the_agent(
    broker: FakeGatewayServer, start_agent: AgentFactory, code: grpc.StatusCode
) -> None:
    broker.gateway.refuse_results = code
    start_agent(slots=1)
    await next_message(broker.gateway, "credit")

    # 128 KiB of output: too large for the control stream, so it goes through PutResult.
    broker.gateway.submit(*make_assignment("t-stale", "echo", [torch.ones(32 << 10)]))
    credit = await next_message(broker.gateway, "credit")
    broker.gateway.refuse_results = None
    broker.gateway.submit(*make_assignment("t-next", "echo", [torch.full((2,), 7.0)]))
    upload = await next_upload(broker.gateway)

    assert credit.credit.slots == 1
    assert upload.header.attempt.task_id == "t-next"
    assert torch.equal(outputs(upload)[0], torch.full((2,), 7.0))
    assert len(broker.gateway.metadata) == 1  # still on its first control stream


async def _one_slot_and_a_full_disk(broker: FakeGatewayServer, start_agent: AgentFactory) -> None:
    """An agent with one slot, against a broker that refuses results as a full spool disk does
    (RESOURCE_EXHAUSTED, asking for another try in 50 ms)."""
    broker.gateway.refuse_results = grpc.StatusCode.RESOURCE_EXHAUSTED
    broker.gateway.retry_after = "0.05"
    start_agent(slots=1)
    await next_message(broker.gateway, "credit")


async def test_outputs_the_broker_cannot_store_yet_are_kept_and_offered_again(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    # The broker's spool disk is full: it refuses the upload, says when to try again, and keeps
    # the attempt leased. The agent keeps the outputs and offers them until they are taken.
    await _one_slot_and_a_full_disk(broker, start_agent)
    data = torch.arange(32 << 10, dtype=torch.float32)  # 128 KiB: through PutResult
    broker.gateway.submit(*make_assignment("t-full", "echo", [data]))

    await wait_for(lambda: broker.gateway.result_calls >= 3, what="three offers")
    beat = await next_message(broker.gateway, "heartbeat")
    broker.gateway.refuse_results = None
    upload = await next_upload(broker.gateway)

    assert [a.task_id for a in beat.heartbeat.running] == ["t-full"]  # still its attempt
    assert upload.header.attempt.task_id == "t-full"
    assert torch.equal(outputs(upload)[0], data)


async def test_a_cancel_ends_the_offers_of_outputs_the_broker_cannot_store(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    await _one_slot_and_a_full_disk(broker, start_agent)
    broker.gateway.submit(*make_assignment("t-full", "echo", [torch.ones(32 << 10)], attempt=2))
    await wait_for(lambda: broker.gateway.result_calls >= 2, what="two offers")

    broker.gateway.cancel("t-full", 2)
    released = (await next_message(broker.gateway, "released")).released
    offers = broker.gateway.result_calls  # the attempt has ended: no offer can follow
    credit = (await next_message(broker.gateway, "credit")).credit

    assert (released.attempt.task_id, released.attempt.attempt) == ("t-full", 2)
    assert credit.slots == 1
    assert broker.gateway.result_calls == offers
    assert broker.gateway.uploads.empty()


async def test_the_agent_reconnects_after_the_broker_restarts_and_drops_lost_work(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    gate = Gate()  # ignores the cancel, so the lost attempt keeps its slot until opened
    start_agent(slots=2, extra={"gate": gate})
    await next_message(broker.gateway, "credit")
    broker.gateway.submit(*make_assignment("t-lost", "gate"))
    await asyncio.to_thread(gate.entered.wait, WAIT_S)

    await broker.stop()
    await wait_for(gate.cancelled.is_set, what="the agent gave up the lost attempt")
    await broker.start()
    hello = await next_message(broker.gateway, "hello")
    first_credit = await next_message(broker.gateway, "credit")
    gate.opened.set()
    freed_credit = await next_message(broker.gateway, "credit")
    broker.gateway.submit(*make_assignment("t-after", "echo", [torch.ones(3)]))
    upload = await next_upload(broker.gateway)

    assert hello.hello.agent_id == "agent-under-test"
    assert first_credit.credit.slots == 1  # the slot still running lost work is not offered
    assert freed_credit.credit.slots == 1  # until that work has stopped
    assert upload.header.attempt.task_id == "t-after"
    assert broker.gateway.uploads.empty()  # nothing was uploaded for the lost attempt


async def test_a_deadline_is_reported_at_once_but_the_slot_waits_for_the_work_to_stop(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    gate = Gate()
    start_agent(slots=1, extra={"gate": gate})
    await next_message(broker.gateway, "credit")

    broker.gateway.submit(*make_assignment("t-stuck", "gate", timeout_s=0.1))
    upload = await next_upload(broker.gateway)
    await asyncio.sleep(0.2)  # a quiet window: no credit while the stuck work holds the slot
    sent_while_stuck = received_kinds(broker.gateway)
    gate.opened.set()
    credit = await next_message(broker.gateway, "credit")

    assert upload.header.error_code == "DEADLINE_EXCEEDED"
    assert "credit" not in sent_while_stuck
    assert credit.credit.slots == 1


async def test_stop_finishes_in_flight_work_uploads_it_and_grants_no_more_credit(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    agent = start_agent(slots=1)
    await next_message(broker.gateway, "credit")
    broker.gateway.submit(
        *make_assignment("t-drain", "sleep", [torch.ones(2)], params={"seconds": 0.3})
    )
    await wait_for(lambda: "t-drain" in broker.gateway.fetched)

    await asyncio.wait_for(agent.stop(), WAIT_S)

    upload = await next_upload(broker.gateway)
    assert upload.header.attempt.task_id == "t-drain" and upload.header.error_code == ""
    assert upload.header.compute_seconds >= 0.3
    assert "credit" not in received_kinds(broker.gateway)


async def test_stop_while_the_broker_is_unreachable_returns_promptly(
    broker: FakeGatewayServer, start_agent: AgentFactory
) -> None:
    await broker.stop()
    agent = start_agent()
    await asyncio.sleep(0.3)  # a few failed connects and backoff pauses

    await asyncio.wait_for(agent.stop(), 2.0)

    assert broker.gateway.metadata == []  # it never connected


@pytest.mark.parametrize(
    ("value", "pause"),
    [("5", 5.0), ("0", 0.05), ("-3", 0.05), ("1e9", 60.0), ("inf", 60.0), ("nan", None),
     ("soon", None), (None, None)],
)  # fmt: skip
def test_the_pause_a_refusal_asks_for_is_bounded_and_garbage_is_no_retry(
    value: str | None, pause: float | None
) -> None:
    trailing = (
        grpc.aio.Metadata() if value is None else grpc.aio.Metadata((RETRY_AFTER_HEADER, value))
    )
    refusal = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailing, "disk full"
    )

    assert retry_after_s(refusal) == pause

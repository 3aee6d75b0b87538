"""Failures users rely on us to survive: dead agents, a crashed broker, cancels, deadlines.

Every test starts its own broker and agents as real processes and kills them with SIGKILL.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from gpubroker.billing.models import tasks, usage
from gpubroker.client import (
    Client,
    DeadlineExceededError,
    GpuBrokerError,
    TaskCancelledError,
    TaskState,
    UnavailableError,
)
from gpubroker.client.codec import encode
from gpubroker.protos import broker_pb2, task_pb2
from gpubroker.protos.convert import meta_to_proto
from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.rpc import AUTH
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # end to end: real broker (and agent) processes


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path).start()
    try:
        yield process
    finally:
        process.stop()


def _usage_rows(database_url: str, task_id: str) -> list[dict[str, object]]:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(usage).where(usage.c.task_id == task_id)).all()
    engine.dispose()
    return [dict(r._mapping) for r in rows]


def test_a_task_on_an_agent_killed_mid_task_completes_on_another_agent_billed_once(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    doomed = AgentProcess(tmp_path, broker.address, "doomed", slots=1).start()
    with Client(broker.address, "key-a") as client:
        payload = torch.arange(10.0)
        handle = client.submit("sleep", [payload], seconds=2.0)
        wait_until(lambda: handle.status().state is TaskState.RUNNING, 60, "the task to start")
        assert handle.status().attempt == 1
        survivor = AgentProcess(tmp_path, broker.address, "survivor", slots=1).start()
        try:
            doomed.kill()

            result = handle.result(timeout=60)

            assert torch.equal(result.output, payload)
            status = handle.status()
            assert status.attempt == 2
            rows = _usage_rows(broker.database_url, handle.task_id)
            assert len(rows) == 1
            assert rows[0]["agent_id"] == "survivor" and rows[0]["attempt"] == 2
        finally:
            survivor.stop()


def test_a_silent_agent_loses_its_lease_and_its_task_is_requeued(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    frozen = AgentProcess(tmp_path, broker.address, "frozen", slots=1).start()
    with Client(broker.address, "key-a") as client:
        handle = client.submit("sleep", [torch.ones(3)], seconds=1.0)
        wait_until(lambda: handle.status().state is TaskState.RUNNING, 60, "the task to start")
        assert frozen.proc is not None
        frozen.proc.send_signal(19)  # SIGSTOP: the TCP connection stays open, heartbeats stop
        try:
            wait_until(lambda: handle.status().state is TaskState.QUEUED, 20, "the lease to expire")
            helper = AgentProcess(tmp_path, broker.address, "helper", slots=1).start()
            result = handle.result(timeout=60)
            assert torch.equal(result.output, torch.ones(3))
            assert handle.status().attempt == 2
            helper.stop()
        finally:
            frozen.proc.send_signal(18)  # SIGCONT, so it can be stopped cleanly
            frozen.stop()


def test_acknowledged_tasks_survive_a_broker_crash(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path).start()
    inputs = [torch.full((4,), float(i)) for i in range(5)]
    with Client(broker.address, "key-a") as client:
        ids = [client.submit("echo", [x]).task_id for x in inputs]
    broker.kill()

    broker.start()
    agent = AgentProcess(tmp_path, broker.address, "after-crash").start()
    try:
        with Client(broker.address, "key-a") as client:
            for task_id, x in zip(ids, inputs, strict=True):
                assert torch.equal(client.task(task_id).result(timeout=60).output, x)
    finally:
        agent.stop()
        broker.stop()


def test_a_run_task_ends_with_its_call_when_the_broker_crashes(tmp_path: Path) -> None:
    """Run ties a task to its call: after a crash the caller has gone, so the task must not
    run (and be billed) for nobody, while a submitted task still does."""
    broker = BrokerProcess(tmp_path).start()
    big = torch.arange(100_000, dtype=torch.float32)  # 400 kB: held in memory, not spooled
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with Client(broker.address, "key-a") as client:
                client.run("echo", [big], timeout=120)
        except GpuBrokerError as exc:
            failures.append(exc)

    caller = threading.Thread(target=run)
    caller.start()
    with Client(broker.address, "key-a") as client:
        submitted = client.submit("echo", [torch.ones(2)]).task_id
        wait_until(lambda: len(client.list_tasks()) == 2, 30, "both tasks to be queued")
        (run_id,) = {t.task_id for t in client.list_tasks()} - {submitted}
    assert not (tmp_path / "spool" / "in" / f"{run_id}.bin").exists()
    broker.kill()
    caller.join(30)
    assert failures and isinstance(failures[0], UnavailableError)

    broker.start()
    agent = AgentProcess(tmp_path, broker.address, "after-crash").start()
    try:
        with Client(broker.address, "key-a") as client:
            assert torch.equal(client.task(submitted).result(timeout=60).output, torch.ones(2))
            status = client.task(run_id).status()
        assert status.state is TaskState.CANCELLED and status.attempt == 0
        assert "call it belonged to ended" in status.error_message
        assert _usage_rows(broker.database_url, run_id) == []
    finally:
        agent.stop()
        broker.stop()


def test_a_task_running_when_the_broker_crashed_runs_again_after_restart(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path).start()
    agent = AgentProcess(tmp_path, broker.address, "a1", slots=1).start()
    try:
        with Client(broker.address, "key-a") as client:
            handle = client.submit("sleep", [torch.ones(2)], seconds=1.0)
            wait_until(lambda: handle.status().state is TaskState.RUNNING, 60, "the task to start")
            task_id = handle.task_id
        broker.kill()
        broker.start()
        agent.stop()
        agent = AgentProcess(tmp_path, broker.address, "a2", slots=1).start()
        with Client(broker.address, "key-a") as client:
            result = client.task(task_id).result(timeout=60)
            assert torch.equal(result.output, torch.ones(2))
            assert client.task(task_id).status().attempt == 2
        assert len(_usage_rows(broker.database_url, task_id)) == 1
    finally:
        agent.stop()
        broker.stop()


def test_cancelling_a_queued_task_means_it_never_runs(broker: BrokerProcess) -> None:
    with Client(broker.address, "key-a") as client:
        handle = client.submit("echo", [torch.ones(3)])

        status = handle.cancel()

        assert status.state is TaskState.CANCELLED
        with pytest.raises(TaskCancelledError):
            handle.result(timeout=10)
    assert not (broker.root / "spool" / "in" / f"{handle.task_id}.bin").exists()


def test_cancelling_a_running_task_stops_it_and_frees_the_slot(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path, broker.address, "busy", slots=1).start()
    try:
        with Client(broker.address, "key-a") as client:
            handle = client.submit("sleep", [torch.ones(1)], seconds=600.0)
            wait_until(lambda: handle.status().state is TaskState.RUNNING, 60, "the task to start")

            assert handle.cancel().state is TaskState.CANCELLED

            with pytest.raises(TaskCancelledError):
                handle.result(timeout=10)
            follow_up = client.run("echo", [torch.ones(2)], timeout=30)
            assert torch.equal(follow_up.output, torch.ones(2))
        assert _usage_rows(broker.database_url, handle.task_id) == []
    finally:
        agent.stop()


def test_a_run_deadline_becomes_the_tasks_deadline(broker: BrokerProcess) -> None:
    with Client(broker.address, "key-a") as client:
        with pytest.raises(DeadlineExceededError):
            client.run("echo", [torch.ones(1)], timeout=1.0)

        (status,) = client.list_tasks(limit=1)
        wait_until(
            lambda: client.task(status.task_id).status().state.is_final, 10, "the task to end"
        )
        final = client.task(status.task_id).status()
        assert (final.state, final.error_code) == (TaskState.FAILED, "DEADLINE_EXCEEDED")


def test_hanging_up_a_run_call_cancels_its_task(broker: BrokerProcess) -> None:
    with Client(broker.address, "key-a") as client:
        calls = client._stub.Run(  # the raw call, so the test can hang up mid-stream
            iter(_run_messages(torch.ones(1))), metadata=AUTH
        )
        first = next(calls)
        calls.cancel()

        wait_until(
            lambda: client.task(first.task.task_id).status().state.is_final, 10, "the cancel"
        )
        assert client.task(first.task.task_id).status().state is TaskState.CANCELLED


def _run_messages(tensor: torch.Tensor) -> list[broker_pb2.RunRequest]:
    meta, data = encode(tensor)
    header = broker_pb2.TaskHeader(workload="echo", inputs=[meta_to_proto(meta)])
    return [
        broker_pb2.RunRequest(header=header),
        broker_pb2.RunRequest(chunk=task_pb2.DataChunk(data=bytes(data))),
    ]


def test_a_submit_deadline_fails_a_task_that_waits_too_long(broker: BrokerProcess) -> None:
    with Client(broker.address, "key-a") as client:
        handle = client.submit("echo", [torch.ones(1)], timeout=0.5)

        wait_until(lambda: handle.status().state.is_final, 10, "the deadline")

        status = handle.status()
        assert status.state is TaskState.FAILED
        assert status.error_code == "DEADLINE_EXCEEDED"


def test_a_retried_submit_with_the_same_request_id_returns_the_same_task(
    broker: BrokerProcess,
) -> None:
    with Client(broker.address, "key-a") as client:
        first = client.submit("echo", [torch.ones(1)], request_id="req-1")
        second = client.submit("echo", [torch.ones(1)], request_id="req-1")

        assert first.task_id == second.task_id
    engine = sa.create_engine(broker.database_url)
    with engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(tasks)).scalar_one()
    engine.dispose()
    assert count == 1


def test_a_broker_crash_between_commit_and_reply_bills_the_task_once(tmp_path: Path) -> None:
    # Given a broker that dies right after committing a success, before answering the agent
    broker = BrokerProcess(tmp_path, env={"GPUBROKER_FAILPOINT": "after-success-commit"}).start()
    agent = AgentProcess(tmp_path, broker.address, "crash-witness", slots=1).start()
    try:
        with Client(broker.address, "key-a") as client:
            handle = client.submit("echo", [torch.arange(5.0)])
        assert broker.proc is not None
        assert broker.proc.wait(60) == 86

        # When it comes back (unarmed), and the agent reconnects to it
        broker.start(env={})
        agent.stop()
        # An agent whose control stream broke exits without asyncio's complaints about a
        # request stream grpc left pending.
        for complaint in ("Task was destroyed", "aclose()", "never retrieved"):
            assert complaint not in agent.log(), agent.log()
        agent = AgentProcess(tmp_path, broker.address, "after-restart", slots=1).start()

        # Then the task is done, with its result, billed exactly once, and never run again
        with Client(broker.address, "key-a") as client:
            result = client.task(handle.task_id).result(timeout=60)
            status = client.task(handle.task_id).status()
        assert torch.equal(result.output, torch.arange(5.0))
        assert (status.state, status.attempt) == (TaskState.SUCCEEDED, 1)
        assert len(_usage_rows(broker.database_url, handle.task_id)) == 1
    finally:
        agent.stop()
        broker.stop()


def test_agents_killed_while_moving_large_payloads_strand_no_task(tmp_path: Path) -> None:
    """Agents SIGKILLed again and again, mostly while they download inputs or upload results
    far over the 64 KiB inline limit (an echo of 8 MiB is almost all transfer): every task
    still finishes, once, with its own bytes, and reconciliation never had to repair one."""
    env = {"GPUBROKER_RECONCILE_S": "1", "GPUBROKER_MAX_LOST_ATTEMPTS": "1000"}
    broker = BrokerProcess(tmp_path, env=env).start()
    payloads = [torch.full((1 << 21,), float(i)) for i in range(16)]  # 8 MiB each
    rng = random.Random(16)
    try:
        with Client(broker.address, "key-a") as client:
            handles = [client.submit("echo", [p]) for p in payloads]
            for n in range(12):
                claims = sum(h.status().attempt for h in handles)
                doomed = AgentProcess(tmp_path, broker.address, f"doomed-{n}", slots=1).start()

                def claimed(before: int = claims) -> bool:
                    statuses = [h.status() for h in handles]
                    done = all(s.state.is_final for s in statuses)
                    return done or sum(s.attempt for s in statuses) > before

                wait_until(claimed, 60, "the doomed agent to take a task", interval=0.01)
                # Fault injection: somewhere in a transfer (8 MiB moves in tens of ms here; a
                # longer sleep let a fast agent finish all it held before the kill).
                time.sleep(rng.uniform(0.0, 0.05))
                doomed.kill()
            survivor = AgentProcess(tmp_path, broker.address, "survivor", slots=2).start()
            try:
                for handle, payload in zip(handles, payloads, strict=True):
                    assert torch.equal(handle.result(timeout=120).output, payload)
            finally:
                survivor.stop()
            attempts = sum(h.status().attempt for h in handles)
        assert attempts > len(handles)  # the kills did cost attempts
        for handle in handles:
            assert len(_usage_rows(broker.database_url, handle.task_id)) == 1
        assert "reconciled task" not in broker.log()
    finally:
        broker.stop()

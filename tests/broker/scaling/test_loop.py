"""The autoscaling loop over a fake provider and a real in-process broker: it records each
launched machine's boot phases (database row and metrics), and holds the launches of a GPU type
after a stuck boot or a launch no zone had room for, until one of its agents connects."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from gpubroker.billing.models import usage, vm_instances
from gpubroker.billing.prices import PriceCatalog
from gpubroker.billing.vms import VmLaunch, record_connected, record_created
from gpubroker.broker.core.registry import AgentSession
from gpubroker.broker.metrics import Metrics
from gpubroker.broker.model import AgentInfo, Task, TaskState
from gpubroker.broker.scaling.backoff import BackoffPolicy
from gpubroker.broker.scaling.loop import ScalingConfig, ScalingLoop
from gpubroker.broker.scaling.policy import ScalingPolicy
from gpubroker.broker.scaling.providers.base import CapacityError, LaunchRequest
from gpubroker.broker.server import BrokerServer
from tests.fakes.provider import FakeProvider
from tests.support.waiting import wait_for

ALWAYS_ONE = ScalingPolicy(
    launch_request=LaunchRequest(("cpu",), spot=False),
    min_instances=1,
    max_instances=2,
    scale_up_cooldown_s=0.0,
    billing_minimum_s=0.0,
)
"""Keeps one machine, so every tick without one launches one."""


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


MakeLoop = Callable[..., ScalingLoop]


@pytest.fixture
async def make_loop(
    broker_server: BrokerServer, provider: FakeProvider, metrics: Metrics
) -> AsyncIterator[MakeLoop]:
    """Loops on ``provider`` and the broker's parts, ticked by the test (never by themselves)."""
    loops: list[ScalingLoop] = []

    def make(
        policy: ScalingPolicy = ALWAYS_ONE, backoff: BackoffPolicy | None = None
    ) -> ScalingLoop:
        s = broker_server
        config = ScalingConfig(policy, interval_s=3600.0, backoff=backoff or BackoffPolicy())
        loop = ScalingLoop(
            provider, config, s.store, s.queue, s.registry, s.engine, PriceCatalog.load(),
            events=metrics,
        )  # fmt: skip
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        await loop.stop(release=False)


def row(server: BrokerServer, name: str) -> dict[str, object] | None:
    query = sa.select(vm_instances).where(vm_instances.c.name == name)
    with server.engine.connect() as conn:
        found = conn.execute(query).first()
    return None if found is None else dict(found._mapping)


def connect_agent(server: BrokerServer, name: str, started_at: datetime | None) -> AgentInfo:
    """What the gateway does with a hello: the agent's session, with its arrival and start."""
    info = AgentInfo(
        agent_id=name, gpu_type="cpu", gpu_memory_bytes=1 << 30, slots=2,
        workloads=frozenset({"echo"}), connected_at=datetime.now(UTC), started_at=started_at,
    )  # fmt: skip
    server.registry.add(AgentSession(info=info))
    return info


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def launched(server: BrokerServer, provider: FakeProvider, count: int) -> str:
    """Waits until the loop has launched and recorded ``count`` machines; the last one's name."""
    name = f"fake-{count}"
    await wait_for(lambda: row(server, name) is not None, what=f"{name} launched and recorded")
    assert len(provider.requests) == count
    return name


async def test_a_launched_machine_records_each_boot_phase(
    broker_server: BrokerServer, provider: FakeProvider, metrics: Metrics, make_loop: MakeLoop
) -> None:
    loop = make_loop()
    await loop.tick()
    name = await launched(broker_server, provider, 1)
    provider.run(name)
    await loop.tick()  # RUNNING seen
    created, running = _moments(row(broker_server, name), "created_at", "running_at")
    await wait_for(lambda: datetime.now(UTC) > running + timedelta(milliseconds=20))
    info = connect_agent(broker_server, name, started_at=running + timedelta(milliseconds=10))

    await loop.tick()  # connected

    recorded = row(broker_server, name)
    started, connected = _moments(recorded, "agent_started_at", "connected_at")
    assert (started, connected) == (info.started_at, info.connected_at)
    expected = {
        "provision": running - created,
        "install": started - running,
        "connect": connected - started,
        "total": connected - created,
    }
    for phase, span in expected.items():
        labels = {"phase": phase, "gpu_type": "cpu"}
        assert sample(metrics, "gpubroker_boot_phase_seconds_count", **labels) == 1.0
        seconds = sample(metrics, "gpubroker_boot_phase_seconds_sum", **labels)
        assert seconds == pytest.approx(span.total_seconds(), abs=1e-6), phase
    assert expected["install"] == timedelta(milliseconds=10)


async def test_a_stuck_boot_holds_launches_of_its_type_until_an_agent_of_it_connects(
    broker_server: BrokerServer,
    provider: FakeProvider,
    metrics: Metrics,
    make_loop: MakeLoop,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = dataclasses.replace(ALWAYS_ONE, boot_timeout_s=0.0)
    loop = make_loop(policy=policy, backoff=BackoffPolicy(initial_s=0.5, max_s=60))
    await loop.tick()
    stuck = await launched(broker_server, provider, 1)

    with caplog.at_level(logging.WARNING, logger="gpubroker.broker.scaling.loop"):
        await loop.tick()  # its agent never connected: deleted as stuck, the type held
        await wait_for(lambda: not provider.list(), what=f"{stuck} deleted")
        await loop.tick()  # still held: no launch

    assert len(provider.requests) == 1
    assert sample(metrics, "gpubroker_launch_failures_total", kind="stuck", gpu_type="cpu",
                  zone="zone-a") == 1.0  # fmt: skip
    held = sample(metrics, "gpubroker_launch_backoff_seconds", gpu_type="cpu", zone="*")
    assert held is not None and 0 < held <= 0.5
    assert sum("not launching cpu" in r.getMessage() for r in caplog.records) == 1

    # The hold ends; the next machine's agent connects, which forgets the failure.
    await wait_for(lambda: loop.backoff.remaining_s("cpu", time.monotonic()) == 0, what="hold")
    await loop.tick()
    replacement = await launched(broker_server, provider, 2)
    connect_agent(broker_server, replacement, started_at=None)
    await loop.tick()

    assert loop.backoff.holds() == []
    assert sample(metrics, "gpubroker_launch_backoff_seconds", gpu_type="cpu", zone="*") == 0.0
    assert row(broker_server, stuck)["end_reason"] == "stuck"  # type: ignore[index]


async def test_no_capacity_anywhere_holds_the_type_instead_of_retrying_each_tick(
    provider: FakeProvider, metrics: Metrics, make_loop: MakeLoop
) -> None:
    loop = make_loop(backoff=BackoffPolicy(initial_s=60))
    provider.refusal = CapacityError("no GCE capacity; tried 2: ...")

    await loop.tick()
    await wait_for(lambda: loop.backoff.hold("cpu") is not None, what="the refusal held")
    for _ in range(3):
        await loop.tick()

    assert len(provider.requests) == 1
    assert sample(metrics, "gpubroker_launch_failures_total", kind="no_capacity",
                  gpu_type="cpu", zone="*") == 1.0  # fmt: skip
    held = sample(metrics, "gpubroker_launch_backoff_seconds", gpu_type="cpu", zone="*")
    assert held is not None and 55 < held <= 60


async def test_a_held_type_is_left_out_of_a_request_that_offers_others(
    provider: FakeProvider, make_loop: MakeLoop
) -> None:
    policy = dataclasses.replace(ALWAYS_ONE, launch_request=LaunchRequest(("cpu", "nvidia-l4")))
    loop = make_loop(policy=policy)
    loop.backoff.fail("cpu", time.monotonic(), "stuck")

    await loop.tick()
    await wait_for(lambda: provider.list(), what="a launch")

    assert [tuple(r.gpu_types) for r in provider.requests] == [("nvidia-l4",)]


def _moments(recorded: dict[str, object] | None, *columns: str) -> tuple[datetime, ...]:
    assert recorded is not None
    moments = tuple(recorded[c] for c in columns)
    assert all(isinstance(m, datetime) for m in moments), moments
    return moments  # type: ignore[return-value]


async def test_each_succeeded_task_teaches_the_policy_its_run_time(make_loop: MakeLoop) -> None:
    loop = make_loop(dataclasses.replace(ALWAYS_ONE, default_run_s=60.0, run_smoothing=0.5))
    done = Task(
        id="t", tenant="a", workload="add", params={}, priority=0, state=TaskState.SUCCEEDED,
        attempt=1, inputs=(), outputs=(), input_bytes=0, output_bytes=0,
        created_at=datetime.now(UTC), compute_seconds=10.0,
    )  # fmt: skip

    loop.observe_task(dataclasses.replace(done, state=TaskState.RUNNING, compute_seconds=None))
    loop.observe_task(dataclasses.replace(done, state=TaskState.FAILED))
    assert loop.autoscaler.run_time_s == 60.0  # only successes teach it
    loop.observe_task(done)
    assert loop.autoscaler.run_time_s == 35.0


async def test_a_restarted_loop_starts_from_the_recorded_boots_and_run_times(
    broker_server: BrokerServer, make_loop: MakeLoop, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker before the restart launched machines that took 200 s and 240 s to boot, and
    # its tasks took 12 s; a fresh loop must start from them, not from the 90 s / 60 s defaults.
    created = datetime.now(UTC) - timedelta(hours=1)
    for i, boot_s in enumerate((200.0, 240.0)):
        name = f"before-{i}"
        vm = VmLaunch(name, "fake", "zone-a", "cpu", "fake-machine", False, 1, "v1")
        record_created(broker_server.engine, vm, created + timedelta(minutes=i))
        at = created + timedelta(minutes=i, seconds=boot_s)
        record_connected(broker_server.engine, name, at)
    with broker_server.engine.begin() as conn:
        conn.execute(usage.insert(), [_usage_row(f"t{i}", 12.0, created) for i in range(40)])
    policy = dataclasses.replace(ALWAYS_ONE, default_boot_s=90.0, default_run_s=60.0)
    loop = make_loop(policy)

    with caplog.at_level(logging.INFO, logger="gpubroker.broker.scaling.loop"):
        await loop.learn_history()

    boots = loop.autoscaler.boots
    assert boots.for_types(("cpu",)) == pytest.approx(0.3 * 240.0 + 0.7 * (0.3 * 200 + 0.7 * 90))
    assert loop.autoscaler.run_time_s == pytest.approx(12.0, abs=0.1)
    assert "learned from 2 recorded boots" in caplog.text


def _usage_row(task_id: str, compute_s: float, at: datetime) -> dict[str, object]:
    return {
        "task_id": task_id, "tenant": "a", "workload": "w", "agent_id": "ag", "gpu_type": "cpu",
        "attempt": 1, "queue_wait_seconds": 0.0, "compute_seconds": compute_s, "bytes_in": 0,
        "bytes_out": 0, "price_per_hour_nanousd": 1, "cost_nanousd": 0, "price_version": "v1",
        "created_at": at,
    }  # fmt: skip

"""The autoscaling loop over the real GCE client and a fake Compute server: a queued task makes
the broker create a Spot VM; an agent with the VM's name joins (standing in for the startup
script) and runs the task; once idle past the grace the VM is deleted and its life is billed.
With no capacity in any zone, the launch is held (backoff) and /metrics shows it."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from google.auth.credentials import AnonymousCredentials
from prometheus_client.parser import text_string_to_metric_families

from gpubroker.billing.models import vm_instances
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.scaling.backoff import BackoffPolicy
from gpubroker.broker.scaling.loop import ScalingConfig, ScalingLoop
from gpubroker.broker.scaling.policy import ScalingPolicy
from gpubroker.broker.scaling.providers.base import LaunchRequest
from gpubroker.broker.scaling.providers.gce import GceProvider, GceSettings
from gpubroker.broker.server import BrokerServer
from gpubroker.client import AsyncClient
from tests.fakes.compute import FakeCompute
from tests.support.cluster import AgentProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # end to end: real broker (and agent) processes

PROJECT = "test-project"


@pytest.fixture
def compute() -> Iterator[FakeCompute]:
    with FakeCompute(project=PROJECT, wait_cap_s=0.05) as fake:
        yield fake


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {"api_keys": {"key-a": "tenant-a"}, "heartbeat_interval_s": 0.3, "lease_timeout_s": 3.0}


def _vms(broker_server: BrokerServer) -> list[dict[str, object]]:
    with broker_server.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(vm_instances))]


async def test_a_queued_task_starts_a_spot_vm_which_is_deleted_once_idle(
    broker_server: BrokerServer, compute: FakeCompute, tmp_path: Path
) -> None:
    catalog = PriceCatalog.load()
    provider = GceProvider(
        GceSettings(
            project=PROJECT,
            zones=("us-central1-a", "us-central1-b"),
            broker_address="broker.internal:50051",
            broker_id="itest",
            agent_package="gpubroker==0.1.0",
            api_endpoint=compute.endpoint,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            poll_interval_s=0.0,
        )
    )
    compute.stockout(zone="us-central1-a")  # the first zone is out: it falls back
    policy = ScalingPolicy(
        launch_request=LaunchRequest(("nvidia-l4",), spot=True, max_run_seconds=3600),
        slots_per_instance=1,
        default_boot_s=1.0,
        min_idle_s=1.0,
        billing_minimum_s=0.0,
        scale_up_cooldown_s=0.5,
    )
    loop = ScalingLoop(
        provider, ScalingConfig(policy, interval_s=0.2), broker_server.store, broker_server.queue,
        broker_server.registry, broker_server.engine, catalog,
    )  # fmt: skip
    loop.start()
    agent: AgentProcess | None = None
    try:
        async with AsyncClient(f"127.0.0.1:{broker_server.port}", "key-a") as client:
            handle = await client.submit("echo", [torch.ones(3)])
            await asyncio.to_thread(wait_until, lambda: len(compute.inserted()) == 2, 20, "insert")
            (vm,) = await asyncio.to_thread(provider.list)
            assert vm.zone == "us-central1-b" and vm.spot
            assert provider.fallbacks["stockout"] == 1

            # The startup script would start this agent on the VM, named after it.
            agent = AgentProcess(
                tmp_path, f"127.0.0.1:{broker_server.port}", vm.name, slots=1
            ).start()
            result = await handle.result(timeout=60)
            assert result.output.tolist() == [1.0, 1.0, 1.0]

            # Gone from the provider first, then recorded: the loop writes deleted_at once
            # the delete call returns, which can be just after the list is empty.
            await asyncio.to_thread(
                wait_until,
                lambda: not provider.list() and _vms(broker_server)[0]["deleted_at"] is not None,
                30,
                "the idle VM to be deleted and its deletion recorded",
            )
        (row,) = _vms(broker_server)
        assert row["name"] == vm.name and row["gpu_type"] == "nvidia-l4" and row["spot"]
        assert (
            row["price_per_hour_nanousd"]
            == catalog.price_for("nvidia-l4", spot=True).per_hour_nanousd
        )
        assert row["running_at"] is not None and row["deleted_at"] is not None
        connected, deleted = row["connected_at"], row["deleted_at"]  # its boot ended
        assert isinstance(connected, datetime) and isinstance(deleted, datetime)
        assert connected <= deleted
        assert row["end_reason"] == "idle"
        assert len(compute.inserted()) == 2  # one stockout, one VM: nothing launched twice
    finally:
        await loop.stop(release=False)
        if agent is not None:
            agent.stop()


def _scrape(broker_server: BrokerServer) -> str:
    url = f"http://127.0.0.1:{broker_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


@pytest.mark.parametrize(
    "broker_overrides",
    [{"api_keys": {"key-a": "tenant-a"}, "metrics_address": "127.0.0.1:0"}],
    ids=["metrics"],
)
async def test_a_stockout_in_every_zone_holds_launches_and_shows_on_metrics(
    broker_server: BrokerServer, compute: FakeCompute
) -> None:
    metrics = broker_server.metrics
    provider = GceProvider(
        GceSettings(
            project=PROJECT,
            zones=("us-central1-a", "us-central1-b"),
            broker_address="broker.internal:50051",
            broker_id="itest",
            agent_package="gpubroker==0.1.0",
            api_endpoint=compute.endpoint,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            poll_interval_s=0.0,
        ),
        on_fallback=metrics.fallback,
    )
    compute.stockout()  # no L4 anywhere, Spot or not
    policy = ScalingPolicy(
        launch_request=LaunchRequest(("nvidia-l4",), spot=True, max_run_seconds=3600),
        min_instances=1,
        scale_up_cooldown_s=0.0,
    )
    config = ScalingConfig(policy, interval_s=0.1, backoff=BackoffPolicy(initial_s=600))
    loop = ScalingLoop(
        provider, config, broker_server.store, broker_server.queue, broker_server.registry,
        broker_server.engine, PriceCatalog.load(), events=metrics,
    )  # fmt: skip
    loop.start()
    try:

        def held_on_metrics() -> float | None:
            text = _scrape(broker_server)
            return _sample(text, "gpubroker_launch_backoff_seconds", gpu_type="nvidia-l4", zone="*")

        await asyncio.to_thread(wait_until, held_on_metrics, 20, "the GPU type's hold on /metrics")
        await asyncio.sleep(1.0)  # a quiet window of ten ticks: none may launch again
        text = await asyncio.to_thread(_scrape, broker_server)
    finally:
        await loop.stop(release=False)

    assert len(compute.inserted()) == 4  # Spot in two zones, on-demand in two: once
    held = _sample(text, "gpubroker_launch_backoff_seconds", gpu_type="nvidia-l4", zone="*")
    assert held is not None and 590 < held <= 600
    for zone in ("us-central1-a", "us-central1-b"):
        zone_held = _sample(
            text, "gpubroker_launch_backoff_seconds", gpu_type="nvidia-l4", zone=zone
        )
        assert zone_held is not None and zone_held > 0
        stockouts = _sample(text, "gpubroker_launch_failures_total", kind="stockout",
                            gpu_type="nvidia-l4", zone=zone)  # fmt: skip
        assert stockouts == 2.0  # Spot, then on-demand
    assert _sample(text, "gpubroker_launch_failures_total", kind="no_capacity",
                   gpu_type="nvidia-l4", zone="*") == 1.0  # fmt: skip

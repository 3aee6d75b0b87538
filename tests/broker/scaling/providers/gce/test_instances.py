"""The ``gce`` provider lists and terminates only its own broker's VMs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gpubroker.broker.scaling.providers.base import (
    Instance,
    InstanceStatus,
    LaunchRequest,
    ProviderError,
)
from gpubroker.broker.scaling.providers.gce import GceProvider
from tests.fakes.compute import FakeCompute

# -- list -----------------------------------------------------------------------------------


def test_list_returns_only_vms_labelled_for_this_broker(
    provider: GceProvider, fake: FakeCompute
) -> None:
    fake.seed("zone-a", "someones-notebook", labels={"team": "ml"})
    fake.seed(
        "zone-b",
        "gpubroker-other-0000aaaa",
        labels={"gpubroker": "agent", "gpubroker-broker": "other"},
    )
    fake.seed(
        "zone-b",
        "gpubroker-test-0000bbbb",
        labels={
            "gpubroker": "agent",
            "gpubroker-broker": "test",
            "gpubroker-gpu": "nvidia-tesla-a100",
            "gpubroker-spot": "true",
        },
        machine_type="a2-highgpu-1g",
        spot=True,
        created=datetime(2025, 3, 1, 9, 30, tzinfo=timezone(timedelta(hours=-8))),
    )
    launched = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"], spot=False))

    found = {i.name: i for i in provider.list()}

    assert set(found) == {launched.name, "gpubroker-test-0000bbbb"}
    assert found[launched.name] == launched
    assert found["gpubroker-test-0000bbbb"] == Instance(
        name="gpubroker-test-0000bbbb",
        zone="zone-b",
        gpu_type="nvidia-tesla-a100",
        machine_type="a2-highgpu-1g",
        spot=True,
        status=InstanceStatus.RUNNING,
        created_at=datetime(2025, 3, 1, 17, 30, tzinfo=UTC),
        labels={
            "gpubroker": "agent",
            "gpubroker-broker": "test",
            "gpubroker-gpu": "nvidia-tesla-a100",
            "gpubroker-spot": "true",
        },
    )


@pytest.mark.parametrize(
    ("gce_status", "status"),
    [
        ("PROVISIONING", InstanceStatus.PROVISIONING),
        ("STAGING", InstanceStatus.STAGING),
        ("RUNNING", InstanceStatus.RUNNING),
        ("REPAIRING", InstanceStatus.STAGING),
        ("STOPPING", InstanceStatus.STOPPING),
        ("SUSPENDING", InstanceStatus.STOPPING),
        ("SUSPENDED", InstanceStatus.TERMINATED),
        ("STOPPED", InstanceStatus.TERMINATED),
        ("TERMINATED", InstanceStatus.TERMINATED),
    ],
)
def test_list_maps_gce_statuses(
    provider: GceProvider, fake: FakeCompute, gce_status: str, status: InstanceStatus
) -> None:
    labels = {"gpubroker": "agent", "gpubroker-broker": "test", "gpubroker-gpu": "nvidia-l4"}
    fake.seed("zone-a", "gpubroker-test-00000001", labels=labels, status=gce_status)

    (instance,) = provider.list()

    assert instance.status is status


def test_preempted_spot_vm_disappears_and_preempted_on_demand_vm_is_terminated(
    provider: GceProvider, fake: FakeCompute
) -> None:
    spot = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"], spot=True))
    standard = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"], spot=False))

    fake.preempt(spot.name)
    fake.preempt(standard.name)

    assert [(i.name, i.status) for i in provider.list()] == [
        (standard.name, InstanceStatus.TERMINATED)
    ]


# -- terminate ------------------------------------------------------------------------------


def test_terminate_deletes_the_vm_and_waits_for_it(
    provider: GceProvider, fake: FakeCompute
) -> None:
    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))
    fake.operation_polls = 2

    provider.terminate(instance.name)

    assert fake.status_of(instance.name) is None
    assert provider.list() == []
    (delete,) = fake.calls("DELETE", f"/zones/zone-a/instances/{instance.name}")
    assert delete.method == "DELETE"


def test_terminate_of_a_vm_that_is_already_gone_is_fine(
    provider: GceProvider, fake: FakeCompute
) -> None:
    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))
    fake.preempt(instance.name)

    provider.terminate(instance.name)
    provider.terminate("gpubroker-test-deadbeef")

    assert fake.calls("DELETE", instance.name) != []


def test_terminate_finds_the_zone_of_a_vm_a_previous_broker_started(
    make_provider: Callable[..., GceProvider], fake: FakeCompute
) -> None:
    labels = {"gpubroker": "agent", "gpubroker-broker": "test"}
    fake.seed("zone-b", "gpubroker-test-0000cccc", labels=labels)

    make_provider().terminate("gpubroker-test-0000cccc")

    assert fake.status_of("gpubroker-test-0000cccc") is None


def test_terminate_refuses_a_vm_of_another_broker(provider: GceProvider, fake: FakeCompute) -> None:
    labels = {"gpubroker": "agent", "gpubroker-broker": "other"}
    fake.seed("zone-a", "gpubroker-other-0000dddd", labels=labels)

    with pytest.raises(ProviderError, match="belongs to broker 'other'"):
        provider.terminate("gpubroker-other-0000dddd")

    assert fake.status_of("gpubroker-other-0000dddd") == "RUNNING"

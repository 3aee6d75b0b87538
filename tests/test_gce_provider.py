"""The ``gce`` provider, with the real ``compute_v1`` REST client against ``FakeCompute``."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import compute_v1

from gpubroker.broker.scaling.providers.base import (
    CapacityError,
    Instance,
    InstanceStatus,
    LaunchRequest,
    ProviderError,
)
from gpubroker.broker.scaling.providers.gce import GceProvider, GceSettings, GpuOffering
from tests.fake_compute import FakeCompute

PROJECT = "test-project"
ZONES = ("zone-a", "zone-b")
TOKEN = "join-token-s3cret"
Fallback = tuple[str, str, str]


def anonymous_credentials() -> Credentials:
    return AnonymousCredentials()  # type: ignore[no-untyped-call]


def make_settings(fake: FakeCompute, **overrides: Any) -> GceSettings:
    values: dict[str, Any] = {
        "project": PROJECT,
        "zones": ZONES,
        "broker_address": "broker.example.com:50051",
        "broker_id": "test",
        "join_token": TOKEN,
        "agent_package": "gpubroker[gpu]==0.1.0",
        "api_endpoint": fake.endpoint,
        "credentials": anonymous_credentials(),
        "poll_interval_s": 0.0,
    }
    return GceSettings(**(values | overrides))


@pytest.fixture
def fake() -> Iterator[FakeCompute]:
    with FakeCompute(project=PROJECT, wait_cap_s=0.05) as fake:
        yield fake


@pytest.fixture
def fallbacks() -> list[Fallback]:
    return []


@pytest.fixture
def make_provider(
    fake: FakeCompute, fallbacks: list[Fallback]
) -> Iterator[Callable[..., GceProvider]]:
    """Providers on clients this fixture owns and closes; keyword arguments go to settings."""
    clients: list[compute_v1.InstancesClient | compute_v1.ZoneOperationsClient] = []

    def make(**overrides: Any) -> GceProvider:
        options = {"api_endpoint": fake.endpoint}
        credentials = anonymous_credentials()
        instances = compute_v1.InstancesClient(
            credentials=credentials, transport="rest", client_options=options
        )
        operations = compute_v1.ZoneOperationsClient(
            credentials=credentials, transport="rest", client_options=options
        )
        clients.extend([instances, operations])
        return GceProvider(
            make_settings(fake, **overrides),
            instances=instances,
            operations=operations,
            on_fallback=lambda reason, zone, gpu: fallbacks.append((reason, zone, gpu)),
        )

    yield make
    for client in clients:
        client.transport.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def provider(make_provider: Callable[..., GceProvider]) -> GceProvider:
    return make_provider()


def metadata(body: dict[str, Any]) -> dict[str, str]:
    return {item["key"]: item["value"] for item in body["metadata"]["items"]}


def eventually(check: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- the VM we ask for ------------------------------------------------------------------------


def test_spot_l4_vm_carries_scheduling_labels_and_no_guest_accelerators(
    provider: GceProvider, fake: FakeCompute
) -> None:
    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"], max_run_seconds=3600))

    (body,) = fake.inserted()
    assert body["name"] == instance.name
    assert body["machineType"] == "zones/zone-a/machineTypes/g2-standard-4"
    assert "guestAccelerators" not in body
    assert body["scheduling"] == {
        "onHostMaintenance": "TERMINATE",
        "automaticRestart": False,
        "provisioningModel": "SPOT",
        "instanceTerminationAction": "DELETE",
        "maxRunDuration": {"seconds": "3600"},
    }
    assert body["labels"] == {
        "gpubroker": "agent",
        "gpubroker-broker": "test",
        "gpubroker-gpu": "nvidia-l4",
        "gpubroker-spot": "true",
    }
    assert body["disks"][0]["boot"] is True
    assert body["disks"][0]["autoDelete"] is True
    assert "deeplearning-platform-release" in body["disks"][0]["initializeParams"]["sourceImage"]


def test_on_demand_t4_vm_attaches_the_gpu_and_has_no_termination_action(
    provider: GceProvider, fake: FakeCompute
) -> None:
    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-tesla-t4"], spot=False))

    (body,) = fake.inserted()
    assert body["machineType"] == "zones/zone-a/machineTypes/n1-standard-4"
    assert body["guestAccelerators"] == [
        {"acceleratorType": "zones/zone-a/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 1}
    ]
    assert body["scheduling"] == {
        "onHostMaintenance": "TERMINATE",
        "automaticRestart": False,
        "provisioningModel": "STANDARD",
    }
    assert body["labels"]["gpubroker-spot"] == "false"
    assert (instance.gpu_type, instance.machine_type, instance.spot) == (
        "nvidia-tesla-t4",
        "n1-standard-4",
        False,
    )


def test_on_demand_vm_with_a_run_limit_is_deleted_when_it_expires(
    provider: GceProvider, fake: FakeCompute
) -> None:
    provider.launch(LaunchRequest(gpu_types=["nvidia-l4"], spot=False, max_run_seconds=600))

    scheduling = fake.inserted()[0]["scheduling"]
    assert scheduling["provisioningModel"] == "STANDARD"
    assert scheduling["instanceTerminationAction"] == "DELETE"
    assert scheduling["maxRunDuration"] == {"seconds": "600"}


def test_startup_script_runs_the_agent_as_the_vm_with_the_token_kept_out_of_the_script(
    provider: GceProvider, fake: FakeCompute
) -> None:
    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    items = metadata(fake.inserted()[0])
    script = items["startup-script"]
    assert items["gpubroker-join-token"] == TOKEN
    assert TOKEN not in script
    assert "gpubroker-join-token" in script
    assert "GPUBROKER_AGENT_JOIN_TOKEN" in script
    assert "pip install" in script
    assert "'gpubroker[gpu]==0.1.0'" in script
    assert (
        "python -m gpubroker.gpu_agent --broker broker.example.com:50051 "
        f"--agent-id {instance.name} --device cuda"
    ) in script
    assert "Restart=always" in script


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_startup_script_is_valid_bash(provider: GceProvider, fake: FakeCompute) -> None:
    provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    script = metadata(fake.inserted()[0])["startup-script"]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=10)


def test_cpu_offering_runs_the_agent_on_the_cpu(
    make_provider: Callable[..., GceProvider], fake: FakeCompute
) -> None:
    provider = make_provider(offerings={"cpu": GpuOffering("n2-standard-2", accelerator_count=0)})

    provider.launch(LaunchRequest(gpu_types=["cpu"]))

    body = fake.inserted()[0]
    assert "guestAccelerators" not in body
    assert "--device cpu" in metadata(body)["startup-script"]


def test_instance_names_are_unique_rfc1035_and_carry_the_broker_id(
    provider: GceProvider,
) -> None:
    names = {provider.launch(LaunchRequest(gpu_types=["nvidia-l4"])).name for _ in range(3)}

    assert len(names) == 3
    for name in names:
        assert name.startswith("gpubroker-test-")
        assert len(name) <= 63
        assert name == name.lower()


def test_settings_repr_does_not_show_the_join_token(fake: FakeCompute) -> None:
    assert TOKEN not in repr(make_settings(fake))


@pytest.mark.parametrize(
    "overrides",
    [
        {"broker_id": "Not_Valid"},
        {"broker_address": "host:1 --evil"},
        {"zones": ()},
        {"offerings": {"Bad GPU": GpuOffering("n1-standard-4", "nvidia-tesla-t4")}},
    ],
)
def test_settings_reject_values_that_cannot_go_into_names_labels_or_scripts(
    fake: FakeCompute, overrides: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        make_settings(fake, **overrides)


def test_provider_builds_its_own_clients_from_endpoint_and_credentials(
    fake: FakeCompute,
) -> None:
    provider = GceProvider(make_settings(fake))

    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert [i.name for i in provider.list()] == [instance.name]


# -- fallbacks ----------------------------------------------------------------------------


def test_stockout_in_the_first_zone_moves_on_to_the_next(
    provider: GceProvider, fake: FakeCompute, fallbacks: list[Fallback]
) -> None:
    fake.stockout("zone-a")

    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert (instance.zone, instance.spot) == ("zone-b", True)
    assert fallbacks == [("stockout", "zone-a", "nvidia-l4")]
    assert provider.fallbacks == {"stockout": 1}
    assert fake.status_of(instance.name) == "RUNNING"


def test_stockout_with_details_also_moves_on(
    provider: GceProvider, fake: FakeCompute, fallbacks: list[Fallback]
) -> None:
    fake.stockout("zone-a", code="ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS")

    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert instance.zone == "zone-b"
    assert fallbacks == [("stockout", "zone-a", "nvidia-l4")]


def test_quota_refused_on_insert_moves_on_to_the_next_zone(
    provider: GceProvider, fake: FakeCompute, fallbacks: list[Fallback]
) -> None:
    fake.quota("zone-a", on_insert=True)

    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert instance.zone == "zone-b"
    assert fallbacks == [("quota", "zone-a", "nvidia-l4")]
    assert provider.fallbacks == {"quota": 1}


def test_quota_refused_by_the_operation_moves_on_to_the_next_zone(
    provider: GceProvider, fake: FakeCompute, fallbacks: list[Fallback]
) -> None:
    fake.quota("zone-a", on_insert=False)

    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert instance.zone == "zone-b"
    assert fallbacks == [("quota", "zone-a", "nvidia-l4")]


@pytest.mark.parametrize(
    ("status", "reason", "message", "fallback"),
    [
        (403, "quotaExceeded", "Quota 'NVIDIA_L4_GPUS' exceeded.  Limit: 0.0", "quota"),
        (403, "rateLimitExceeded", "Rate Limit Exceeded", "quota"),
        (503, "resourceExhausted", "ZONE_RESOURCE_POOL_EXHAUSTED: no L4 here", "stockout"),
    ],
)
def test_capacity_errors_returned_by_the_insert_call_itself_move_on(
    provider: GceProvider,
    fake: FakeCompute,
    fallbacks: list[Fallback],
    status: int,
    reason: str,
    message: str,
    fallback: str,
) -> None:
    fake.reject("zone-a", status=status, reason=reason, message=message)

    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert instance.zone == "zone-b"
    assert fallbacks == [(fallback, "zone-a", "nvidia-l4")]


def test_spot_exhausted_everywhere_falls_back_to_on_demand(
    provider: GceProvider, fake: FakeCompute, fallbacks: list[Fallback]
) -> None:
    fake.stockout(spot=True)

    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"], spot=True))

    assert (instance.zone, instance.spot) == ("zone-a", False)
    assert fake.inserted()[-1]["scheduling"]["provisioningModel"] == "STANDARD"
    assert fallbacks == [
        ("stockout", "zone-a", "nvidia-l4"),
        ("stockout", "zone-b", "nvidia-l4"),
        ("spot_exhausted", "*", "nvidia-l4"),
    ]
    assert provider.fallbacks == {"stockout": 2, "spot_exhausted": 1}


def test_next_gpu_type_is_tried_when_the_first_is_out_everywhere(
    provider: GceProvider, fake: FakeCompute
) -> None:
    fake.stockout(gpu_type="nvidia-l4")

    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4", "nvidia-tesla-t4"]))

    assert (instance.gpu_type, instance.zone, instance.spot) == ("nvidia-tesla-t4", "zone-a", True)
    assert provider.fallbacks == {"stockout": 4, "spot_exhausted": 1}


def test_nothing_anywhere_raises_capacity_error_listing_every_attempt(
    provider: GceProvider, fake: FakeCompute, fallbacks: list[Fallback]
) -> None:
    fake.stockout("zone-a")
    fake.quota("zone-b")

    with pytest.raises(CapacityError) as exc_info:
        provider.launch(LaunchRequest(gpu_types=["nvidia-l4"], spot=True))

    message = str(exc_info.value)
    assert "tried 4" in message
    for attempt in (
        "nvidia-l4 (g2-standard-4) spot in zone-a: stockout",
        "nvidia-l4 (g2-standard-4) spot in zone-b: quota",
        "nvidia-l4 (g2-standard-4) on-demand in zone-a: stockout",
        "nvidia-l4 (g2-standard-4) on-demand in zone-b: quota",
    ):
        assert attempt in message
    assert len(fallbacks) == 5
    assert provider.list() == []


def test_invalid_request_raises_provider_error_without_trying_other_zones(
    provider: GceProvider, fake: FakeCompute, fallbacks: list[Fallback]
) -> None:
    fake.reject("zone-a", status=400, reason="invalid")

    with pytest.raises(ProviderError) as exc_info:
        provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert not isinstance(exc_info.value, CapacityError)
    assert "Invalid value" in str(exc_info.value)
    assert len(fake.inserted()) == 1
    assert fallbacks == []


def test_other_operation_error_raises_provider_error(
    provider: GceProvider, fake: FakeCompute
) -> None:
    fake.reject("zone-a", operation_code="UNSUPPORTED_OPERATION", message="no such image")

    with pytest.raises(ProviderError, match="UNSUPPORTED_OPERATION: no such image") as exc_info:
        provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert not isinstance(exc_info.value, CapacityError)


def test_unknown_gpu_types_raise_provider_error_and_create_nothing(
    provider: GceProvider, fake: FakeCompute
) -> None:
    with pytest.raises(ProviderError, match="no GCE offering") as exc_info:
        provider.launch(LaunchRequest(gpu_types=["nvidia-quantum-9000"]))

    assert not isinstance(exc_info.value, CapacityError)
    assert fake.requests == []


# -- slow operations and boots --------------------------------------------------------------


def test_launch_waits_for_the_operation_and_reports_a_booting_vm(
    provider: GceProvider, fake: FakeCompute
) -> None:
    fake.operation_polls = 3
    fake.boot_seconds = 0.8

    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert len(fake.calls("POST", "/wait")) == 4
    assert instance.status is InstanceStatus.PROVISIONING
    eventually(lambda: provider.list()[0].status is InstanceStatus.RUNNING)


def test_launch_keeps_waiting_when_wait_returns_before_the_operation_is_done(
    provider: GceProvider, fake: FakeCompute
) -> None:
    fake.operation_seconds = 0.3

    started = time.monotonic()
    instance = provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    assert time.monotonic() - started >= 0.3
    assert len(fake.calls("POST", "/wait")) >= 2
    assert fake.status_of(instance.name) == "RUNNING"


def test_operation_that_never_finishes_raises_provider_error_and_the_vm_stays_findable(
    make_provider: Callable[..., GceProvider], fake: FakeCompute
) -> None:
    provider = make_provider(operation_timeout_s=0.2)
    fake.operation_seconds = 0.5

    with pytest.raises(ProviderError, match=r"not done after 0\.2 s"):
        provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    (body,) = fake.inserted()
    eventually(lambda: fake.status_of(body["name"]) == "RUNNING")
    fake.operation_seconds = 0.0
    provider.terminate(body["name"])
    assert fake.status_of(body["name"]) is None


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

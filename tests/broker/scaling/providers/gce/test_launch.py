"""The ``gce`` provider asks for the VM the launch request describes (real client, fake API)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from gpubroker.broker.scaling.providers.base import (
    LaunchRequest,
)
from gpubroker.broker.scaling.providers.gce import GceProvider, GpuOffering
from tests.fakes.compute import FakeCompute
from tests.support.gce import TOKEN, make_settings, metadata

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


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_extra_packages_join_the_agent_in_one_uv_install_each_as_one_word(
    make_provider: Callable[..., GceProvider], fake: FakeCompute
) -> None:
    extras = [
        "gpubroker-example-workloads @ https://example.com/w-0.1.0-py3-none-any.whl",
        "x'; touch /tmp/gpubroker-pwned; echo '$(id)",
        "torch==2.5.1",
    ]
    provider = make_provider(agent_extra_packages=extras)

    provider.launch(LaunchRequest(gpu_types=["nvidia-l4"]))

    script = metadata(fake.inserted()[0])["startup-script"]
    (install,) = [line for line in script.splitlines() if "pip install" in line]
    # The install line, run by bash against a uv that prints the words it was given.
    fake_uv = 'uv() { printf "%s\\n" "$@"; }\nagent=/venv\n'
    words = subprocess.run(
        ["bash", "-c", fake_uv + install], capture_output=True, text=True, check=True, timeout=10
    ).stdout.splitlines()
    assert words == [
        "pip",
        "install",
        "--python",
        "/venv/bin/python",
        "gpubroker[gpu]==0.1.0",
        *extras,
    ]


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

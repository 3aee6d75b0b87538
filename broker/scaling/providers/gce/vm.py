"""The agent VM a launch creates: its placement, its labels and its instance resource.

Every VM is labelled ``gpubroker=agent`` and ``gpubroker-broker=<broker id>`` so that the
provider finds it again after a broker restart, and several brokers can share a project without
adopting each other's VMs. Every VM also carries ``scheduling.max_run_duration`` (when the
request gives one) with termination action DELETE, so a crashed broker cannot leak it for long.
It boots a Deep Learning VM image (NVIDIA driver included) that runs the agent from its
``startup-script`` (``gpubroker.broker.scaling.providers.gce.startup``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.cloud import compute_v1

from gpubroker.broker.scaling.providers.gce.settings import GceSettings, GpuOffering
from gpubroker.broker.scaling.providers.gce.startup import JOIN_TOKEN_METADATA_KEY, startup_script

__all__ = [
    "BROKER_LABEL",
    "GPU_LABEL",
    "ROLE_LABEL",
    "SPOT_LABEL",
    "Placement",
    "instance_body",
]

ROLE_LABEL = "gpubroker"
"""Label every agent VM carries, with the value ``agent``."""
BROKER_LABEL = "gpubroker-broker"
"""Label naming the broker (``GceSettings.broker_id``) that owns the VM."""
GPU_LABEL = "gpubroker-gpu"
"""Label holding the catalog GPU type."""
SPOT_LABEL = "gpubroker-spot"
"""Label holding ``true`` or ``false``."""


@dataclass(frozen=True, slots=True)
class Placement:
    """One (zone, GPU type, pricing) that a launch tries."""

    zone: str
    gpu_type: str
    offering: GpuOffering
    spot: bool

    def __str__(self) -> str:
        pricing = "spot" if self.spot else "on-demand"
        return f"{self.gpu_type} ({self.offering.machine_type}) {pricing} in {self.zone}"


def instance_body(
    settings: GceSettings, name: str, placement: Placement, max_run_seconds: int | None
) -> compute_v1.Instance:
    """The instance resource of a new agent VM: labelled, with its startup script, and set to
    delete itself when Spot capacity is reclaimed or ``max_run_seconds`` runs out."""
    labels = {
        ROLE_LABEL: "agent",
        BROKER_LABEL: settings.broker_id,
        GPU_LABEL: placement.gpu_type,
        SPOT_LABEL: "true" if placement.spot else "false",
    }
    offering = placement.offering
    accelerator = compute_v1.AcceleratorConfig(
        accelerator_type=f"zones/{placement.zone}/acceleratorTypes/{offering.accelerator_type}",
        accelerator_count=offering.accelerator_count,
    )
    return compute_v1.Instance(
        name=name,
        machine_type=f"zones/{placement.zone}/machineTypes/{offering.machine_type}",
        guest_accelerators=[accelerator] if offering.attaches_accelerators else [],
        disks=[_boot_disk(settings, placement.zone, labels)],
        network_interfaces=[_network_interface(settings)],
        service_accounts=_service_accounts(settings),
        scheduling=_scheduling(placement.spot, max_run_seconds),
        labels=labels,
        metadata=_metadata(settings, name, offering),
    )


def _boot_disk(
    settings: GceSettings, zone: str, labels: Mapping[str, str]
) -> compute_v1.AttachedDisk:
    return compute_v1.AttachedDisk(
        boot=True,
        auto_delete=True,
        initialize_params=compute_v1.AttachedDiskInitializeParams(
            source_image=settings.image,
            disk_size_gb=settings.boot_disk_gb,
            disk_type=f"zones/{zone}/diskTypes/{settings.boot_disk_type}",
            labels=dict(labels),
        ),
    )


def _network_interface(settings: GceSettings) -> compute_v1.NetworkInterface:
    nic = compute_v1.NetworkInterface(network=settings.network)
    if settings.subnetwork:
        nic.subnetwork = settings.subnetwork
    if settings.external_ip:
        nic.access_configs = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
    return nic


def _service_accounts(settings: GceSettings) -> list[compute_v1.ServiceAccount]:
    if settings.service_account is None:
        return []
    return [compute_v1.ServiceAccount(email=settings.service_account, scopes=settings.scopes)]


def _scheduling(spot: bool, max_run_seconds: int | None) -> compute_v1.Scheduling:
    scheduling = compute_v1.Scheduling(
        on_host_maintenance="TERMINATE",  # GPUs cannot live-migrate
        automatic_restart=False,
        provisioning_model="SPOT" if spot else "STANDARD",
    )
    if spot or max_run_seconds is not None:
        # GCE takes a termination action only for Spot VMs or VMs with a run limit.
        scheduling.instance_termination_action = "DELETE"
    if max_run_seconds is not None:
        scheduling.max_run_duration = compute_v1.Duration(seconds=max_run_seconds)
    return scheduling


def _metadata(settings: GceSettings, name: str, offering: GpuOffering) -> compute_v1.Metadata:
    items = [
        compute_v1.Items(key="startup-script", value=startup_script(settings, name, offering)),
        # Deep Learning VM images install the NVIDIA driver on first boot when asked to.
        compute_v1.Items(key="install-nvidia-driver", value="True"),
    ]
    if settings.join_token:
        items.append(compute_v1.Items(key=JOIN_TOKEN_METADATA_KEY, value=settings.join_token))
    return compute_v1.Metadata(items=items)

"""The ``Provider`` interface the autoscaler drives, and the value types it speaks in.

A provider starts and stops the machines GPU agents run on: ``local`` runs ``gpu_agent``
processes on this machine, ``gce`` creates Google Cloud VMs. Methods are synchronous (the GCE
client blocks on HTTP); the autoscaler calls them from a worker thread. Every instance a
provider starts is marked as ours (GCE labels, a process registry) so that ``list`` finds all
of them again after a broker restart, and nothing is leaked.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

__all__ = [
    "CapacityError",
    "Instance",
    "InstanceStatus",
    "LaunchRequest",
    "Provider",
    "ProviderError",
    "QuotaError",
    "StockoutError",
]


class InstanceStatus(enum.Enum):
    """Where an instance is in its life; GCE's status names, which local processes map onto."""

    PROVISIONING = "PROVISIONING"
    STAGING = "STAGING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    TERMINATED = "TERMINATED"

    @property
    def is_live(self) -> bool:
        """True while the instance costs money or is about to."""
        return self is not InstanceStatus.TERMINATED


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """What the autoscaler asks for: one agent machine of one of these offerings."""

    gpu_types: Sequence[str]
    """Acceptable GPU types, most preferred first (catalog names, e.g. ``nvidia-l4``)."""
    spot: bool = True
    """Try Spot first; providers fall back to on-demand when Spot is out everywhere."""
    max_run_seconds: int | None = None
    """Hard cap on the machine's life, so a crashed broker cannot leak it forever."""


@dataclass(frozen=True, slots=True)
class Instance:
    """One machine a provider started (or found, labelled as ours)."""

    name: str
    """Unique name; also the agent id the machine's agent connects with."""
    zone: str
    """GCE zone, or ``local``."""
    gpu_type: str
    """Catalog GPU type, e.g. ``nvidia-l4`` or ``cpu``."""
    machine_type: str
    """GCE machine type, or ``local``."""
    spot: bool
    """Spot (preemptible) pricing."""
    status: InstanceStatus
    """Current status."""
    created_at: datetime
    """When the provider created it (UTC)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Provider labels; ours carry ``gpubroker-broker=<broker id>``."""


class ProviderError(Exception):
    """A provider call failed for a reason other than capacity."""


class CapacityError(ProviderError):
    """No instance could be started: every zone, GPU type and pricing choice was refused."""


class StockoutError(CapacityError):
    """The zone has no capacity for this offering (``ZONE_RESOURCE_POOL_EXHAUSTED``)."""


class QuotaError(CapacityError):
    """The project's quota does not allow another instance of this offering here."""


class Provider(Protocol):
    """Starts, lists and stops agent machines. Implementations: ``local`` and ``gce``."""

    name: str
    """``local`` or ``gce``."""

    def launch(self, request: LaunchRequest) -> Instance:
        """Starts one machine whose agent will join this broker; returns once it is created.

        Tries each zone and GPU type in order, Spot before on-demand when ``request.spot``;
        every fallback is logged and counted.

        Raises:
            CapacityError: nothing could be started anywhere.
            ProviderError: any other failure.
        """
        ...

    def list(self) -> list[Instance]:
        """Every live instance marked as ours, including ones a previous broker started."""
        ...

    def terminate(self, name: str) -> None:
        """Deletes an instance; one that is already gone is not an error."""
        ...

"""The ``gce`` provider: agents on Google Compute Engine GPU VMs, Spot first, across zones.

``settings`` holds what it is configured with, ``vm`` what each VM is made of, ``startup`` the
script that runs the agent on it, and ``provider`` the calls that create, list and delete VMs.
Importing this package needs ``google-cloud-compute`` (the ``gce`` extra).
"""

from __future__ import annotations

from gpubroker.broker.scaling.providers.gce.provider import GceProvider
from gpubroker.broker.scaling.providers.gce.settings import (
    DEFAULT_OFFERINGS,
    GceSettings,
    GpuOffering,
)

__all__ = ["DEFAULT_OFFERINGS", "GceProvider", "GceSettings", "GpuOffering"]

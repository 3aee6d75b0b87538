"""Where GPU agents come from: providers start and stop the machines agents run on."""

from __future__ import annotations

from gpubroker.broker.scaling.providers.base import (
    CapacityError,
    Instance,
    InstanceStatus,
    LaunchRequest,
    Provider,
    ProviderError,
    QuotaError,
    StockoutError,
)

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

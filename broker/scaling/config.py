"""The autoscaler's configuration: one TOML file (``--scaling-config``), a table per concern.

``[policy]`` is the ``ScalingPolicy`` (plus ``interval_s``, ``gpu_types``, ``spot``,
``max_run_seconds`` and ``max_hourly_spend_usd``, from which the loader derives the launch
request and its prices), ``[backoff]`` the ``BackoffPolicy`` for failed launches, and ``[local]``
or ``[gce]`` the provider's settings. See ``docs/deploy.md``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubroker.billing.prices import GPU_MEMORY_BYTES, PriceCatalog, to_nanousd
from gpubroker.broker.core.capacity import GpuOffer
from gpubroker.broker.scaling.backoff import BackoffPolicy
from gpubroker.broker.scaling.demand import GpuChoice
from gpubroker.broker.scaling.policy import ScalingPolicy, worst_case_price_nanousd
from gpubroker.broker.scaling.providers.base import LaunchRequest

__all__ = ["PROVIDERS", "ScalingConfig", "load_scaling_config", "offers_of"]

PROVIDERS = ("none", "local", "gce")
"""``none``: agents join on their own; ``local``: agent processes here; ``gce``: GPU VMs."""


@dataclass(frozen=True, slots=True)
class ScalingConfig:
    """What the loop runs with: the policy, the provider's own table, the tick, the backoff."""

    policy: ScalingPolicy = field(default_factory=ScalingPolicy)
    provider_table: Mapping[str, Any] = field(default_factory=dict)
    """The ``[local]`` or ``[gce]`` table, turned into the provider's settings by the server."""
    interval_s: float = 2.0
    """Seconds between decisions."""
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    """How long stuck boots and stockouts hold further launches of a GPU type."""


_COMPUTED = {"launch_request", "launch_price_nanousd", "max_hourly_spend_nanousd", "choices"}
"""ScalingPolicy fields the loader derives (from gpu_types, spot, max_hourly_spend_usd...)."""


def load_scaling_config(path: Path | None, provider: str, catalog: PriceCatalog) -> ScalingConfig:
    """Reads the TOML file (None: defaults); unknown keys are an error, not a silent typo."""
    data = tomllib.loads(path.read_text()) if path is not None else {}
    unknown = set(data) - {"policy", "backoff", "local", "gce"}
    if unknown:
        raise ValueError(
            f"{path}: unknown tables {sorted(unknown)}; use policy, backoff, local, gce"
        )
    table = dict(data.get("policy", {}))
    interval = float(table.pop("interval_s", 2.0))
    request = LaunchRequest(
        gpu_types=tuple(table.pop("gpu_types", ["cpu"] if provider == "local" else ["nvidia-l4"])),
        spot=bool(table.pop("spot", provider == "gce")),
        max_run_seconds=table.pop("max_run_seconds", 24 * 3600 if provider == "gce" else None),
    )
    spend = table.pop("max_hourly_spend_usd", None)
    names = {f.name for f in dataclasses.fields(ScalingPolicy)} - _COMPUTED
    if bad := set(table) - names:
        raise ValueError(f"{path}: unknown [policy] keys {sorted(bad)}")
    defaults: dict[str, Any] = {"launch_request": request}
    if provider == "local":  # a process starts in about a second, not a VM's minute and a half
        defaults |= {"default_boot_s": 3.0, "min_idle_s": 10.0, "billing_minimum_s": 0.0}
    policy = ScalingPolicy(
        **(
            defaults
            | table
            | {
                "launch_price_nanousd": worst_case_price_nanousd(catalog, request),
                "choices": _choices(catalog, request),
                "max_hourly_spend_nanousd": None if spend is None else to_nanousd(str(spend)),
            }
        )
    )
    backoff = BackoffPolicy(**data.get("backoff", {}))
    return ScalingConfig(policy, data.get(provider, {}), interval, backoff)


def _choices(catalog: PriceCatalog, request: LaunchRequest) -> tuple[GpuChoice, ...]:
    """The configured GPU types with their memory and prices (Spot or not, as configured)."""
    return tuple(
        GpuChoice(
            g,
            GPU_MEMORY_BYTES.get(g, 0),
            catalog.price_for(g, spot=request.spot).per_hour_nanousd,
            catalog.price_for(g, spot=False).per_hour_nanousd,
        )
        for g in request.gpu_types
    )


def offers_of(config: ScalingConfig) -> list[GpuOffer]:
    """What the autoscaler can start, for the submit check (``Capacity``).

    A ``cpu`` agent is one the local provider starts on this host, so its memory is this
    host's RAM, as the agent itself reports it.
    """
    policy = config.policy
    choices = policy.choices or [GpuChoice(g) for g in policy.launch_request.gpu_types]
    return [GpuOffer(c.gpu_type, c.memory_bytes or _known_memory(c.gpu_type)) for c in choices]


def _known_memory(gpu_type: str) -> int | None:
    if gpu_type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return GPU_MEMORY_BYTES.get(gpu_type)

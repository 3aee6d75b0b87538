"""The price catalog: $/hour per GPU offering, on-demand and Spot, as exact decimals.

Money is handled as whole nano-dollars (1e-9 USD) in integers and as ``Decimal`` at the edges,
never as floats.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from gpubroker.billing.errors import PriceCatalogError, UnknownPriceError

__all__ = [
    "CURRENCY",
    "DEFAULT_GPU_TYPE",
    "GPU_MEMORY_BYTES",
    "NANO",
    "BillingPolicy",
    "Price",
    "PriceCatalog",
    "cost_nanousd",
    "format_usd",
    "prorated_nanousd",
    "to_nanousd",
]

NANO = Decimal(1_000_000_000)
"""Nano-dollars per dollar."""

CURRENCY = "USD"
"""The only currency a catalog may be in: every amount in the ledger is nano-USD."""

DEFAULT_GPU_TYPE = "default"
"""The catalog entry, if any, that prices GPU types the catalog does not list."""

GPU_MEMORY_BYTES: Mapping[str, int] = {
    "nvidia-tesla-p4": 8 << 30,
    "nvidia-tesla-t4": 16 << 30,
    "nvidia-tesla-v100": 16 << 30,
    "nvidia-tesla-p100": 16 << 30,
    "nvidia-l4": 24 << 30,
    "nvidia-tesla-a100": 40 << 30,
    "nvidia-a100-80gb": 80 << 30,
    "nvidia-h100-80gb": 80 << 30,
    "nvidia-h100-mega-80gb": 80 << 30,
    "nvidia-h200-141gb": 141 << 30,
    "nvidia-b200": 180 << 30,
}
"""Device memory of each GCE accelerator type (its nominal size, in GiB), for placing tasks
that need a least memory on machines not started yet; a type not listed counts as unknown."""


@dataclass(frozen=True, slots=True)
class Price:
    """One hour of one offering."""

    gpu_type: str
    per_hour_nanousd: int
    """Whole nano-dollars per hour."""
    spot: bool
    version: str
    """The catalog version this price came from."""


def to_nanousd(amount: str | Decimal) -> int:
    """Converts a dollar amount ("0.35") to whole nano-dollars, exactly."""
    try:
        value = Decimal(amount) * NANO
    except InvalidOperation as exc:
        raise PriceCatalogError(f"{amount!r} is not a decimal amount") from exc
    if not value.is_finite():
        raise PriceCatalogError(f"{amount!r} is not a finite amount")
    if value != value.to_integral_value() or value < 0:
        raise PriceCatalogError(f"{amount!r} is negative or finer than a nano-dollar")
    return int(value)


@dataclass(frozen=True, slots=True)
class BillingPolicy:
    """How measured compute time becomes a charge."""

    granularity_seconds: Decimal = Decimal(0)
    """Time is billed per started increment of this; 0 bills it exactly."""
    minimum_nanousd: int = 0
    """The least a successful task costs."""


def cost_nanousd(
    compute_seconds: float, price: Price, policy: BillingPolicy = BillingPolicy()
) -> int:
    """Cost of ``compute_seconds`` at ``price`` under ``policy``, half-up to a nano-dollar.

    The seconds are taken as the decimal the float prints as (``repr``), and the rest is exact
    integer arithmetic on that fraction (this runs for every successful task; it takes 60 %
    of the time ``Decimal`` arithmetic took, and no decimal context can round it early).

    Raises:
        ValueError: ``compute_seconds`` is negative, infinite or NaN.
    """
    if not math.isfinite(compute_seconds) or compute_seconds < 0:
        raise ValueError(
            f"compute time must be a finite, non-negative number of seconds: {compute_seconds!r}"
        )
    num, den = Decimal(repr(compute_seconds)).as_integer_ratio()
    step = policy.granularity_seconds
    if step > 0:  # per started step: ceil(seconds / step) steps
        step_num, step_den = step.as_integer_ratio()
        steps = -(-(num * step_den) // (den * step_num))
        num, den = steps * step_num, step_den
    return max(prorated_nanousd(num, den * 3600, price.per_hour_nanousd), policy.minimum_nanousd)


def prorated_nanousd(units: int, units_per_hour: int, per_hour_nanousd: int) -> int:
    """``units`` of an hour divided into ``units_per_hour`` at ``per_hour_nanousd``, rounded
    half up to a nano-dollar, in exact integers (the one rounding of every charge)."""
    # floor(x + 1/2) with x = units * price / units_per_hour; x is never negative
    return (2 * units * per_hour_nanousd + units_per_hour) // (2 * units_per_hour)


def format_usd(nanousd: int, places: int = 9) -> str:
    """Formats nano-dollars as dollars, e.g. ``$0.017750000``."""
    amount = (Decimal(nanousd) / NANO).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return f"${amount:f}"  # :f, or zero prints as "0E-9"


class PriceCatalog:
    """Prices by GPU type, loaded from a TOML file."""

    def __init__(
        self,
        version: str,
        prices: Mapping[tuple[str, bool], Price],
        policy: BillingPolicy = BillingPolicy(),
    ) -> None:
        self._version = version
        self._prices = dict(prices)
        self.policy = policy

    @classmethod
    def load(cls, path: Path | None = None) -> PriceCatalog:
        """Reads a catalog file; None means the packaged ``prices.toml``."""
        if path is None:
            text = resources.files("gpubroker.billing").joinpath("prices.toml").read_text()
        else:
            text = path.read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PriceCatalogError(f"price catalog is not valid TOML: {exc}") from exc
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PriceCatalog:
        """Builds a catalog from parsed TOML."""
        version = data.get("version")
        if not isinstance(version, str) or not version:
            raise PriceCatalogError("price catalog needs a string 'version'")
        currency = data.get("currency", CURRENCY)
        if currency != CURRENCY:
            raise PriceCatalogError(f"price catalog currency {currency!r} is not {CURRENCY}")
        prices: dict[tuple[str, bool], Price] = {}
        for gpu_type, entry in dict(data.get("gpu", {})).items():
            prices.update(_offering(gpu_type, entry, version))
        return cls(version, prices, _policy(dict(data.get("policy", {}))))

    @property
    def version(self) -> str:
        """The catalog's version string."""
        return self._version

    def price_for(self, gpu_type: str, *, spot: bool = False) -> Price:
        """The hourly price of a GPU type.

        A type the catalog does not list gets the catalog's ``default`` entry when it has one
        (the returned ``Price`` then says ``gpu_type="default"``); otherwise it is an error.

        Raises:
            UnknownPriceError: neither ``gpu_type`` nor ``default`` is in the catalog.
        """
        found = self._prices.get((gpu_type, spot)) or self._prices.get((DEFAULT_GPU_TYPE, spot))
        if found is None:
            known = ", ".join(sorted({g for g, _ in self._prices}))
            raise UnknownPriceError(
                f"no {'spot' if spot else 'on-demand'} price for GPU type {gpu_type!r}; "
                f"the catalog (version {self._version}) knows: {known}"
            )
        return found


def _offering(gpu_type: str, entry: Any, version: str) -> dict[tuple[str, bool], Price]:
    """The on-demand and Spot prices of one ``[gpu.<type>]`` table."""
    if not isinstance(entry, Mapping):
        raise PriceCatalogError(f"gpu.{gpu_type} must be a table, not {entry!r}")
    prices: dict[tuple[str, bool], Price] = {}
    for spot, key in ((False, "on_demand_per_hour"), (True, "spot_per_hour")):
        amount = entry.get(key)
        if not isinstance(amount, str):
            raise PriceCatalogError(
                f'gpu.{gpu_type}.{key} must be a decimal string like "0.35", '
                f"not {amount!r} (floats lose cents)"
            )
        prices[gpu_type, spot] = Price(gpu_type, to_nanousd(amount), spot, version)
    return prices


def _policy(data: Mapping[str, Any]) -> BillingPolicy:
    if data.get("charge_lost_attempts", False) is not False:
        raise PriceCatalogError("policy.charge_lost_attempts must be false: lost attempts are free")
    granularity = data.get("granularity_seconds", "0")
    minimum = data.get("minimum_charge_usd", "0")
    if not isinstance(granularity, str) or not isinstance(minimum, str):
        raise PriceCatalogError('policy amounts must be decimal strings like "0.001"')
    try:
        step = Decimal(granularity)
    except InvalidOperation as exc:
        raise PriceCatalogError(
            f"policy.granularity_seconds {granularity!r} is not a decimal"
        ) from exc
    if step < 0:
        raise PriceCatalogError(f"policy.granularity_seconds {granularity!r} is negative")
    return BillingPolicy(granularity_seconds=step, minimum_nanousd=to_nanousd(minimum))

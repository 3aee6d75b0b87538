"""The price catalog and money arithmetic, against hand-computed figures. No database."""

from __future__ import annotations

import math
import random
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from gpubroker.billing.errors import PriceCatalogError, UnknownPriceError
from gpubroker.billing.prices import (
    BillingPolicy,
    Price,
    PriceCatalog,
    cost_nanousd,
    format_usd,
    to_nanousd,
)


def _catalog(**gpu: tuple[str, str]) -> dict[str, Any]:
    tables = {
        name: {"on_demand_per_hour": od, "spot_per_hour": sp} for name, (od, sp) in gpu.items()
    }
    return {"version": "v1", "gpu": tables}


def test_90_seconds_on_an_l4_cost_exactly_a_fortieth_of_its_hourly_price() -> None:
    price = PriceCatalog.load().price_for("nvidia-l4")

    cost = cost_nanousd(90.0, price)

    assert price.per_hour_nanousd == 710_000_000
    assert cost == 17_750_000
    assert format_usd(cost) == "$0.017750000"


def test_an_hour_on_an_h100_costs_its_listed_price() -> None:
    price = PriceCatalog.load().price_for("nvidia-h100-80gb")

    assert cost_nanousd(3600.0, price) == 10_980_000_000
    assert format_usd(cost_nanousd(3600.0, price)) == "$10.980000000"


def test_costs_round_half_up_to_a_whole_nanodollar() -> None:
    price = Price("x", per_hour_nanousd=3600 * 3, spot=False, version="v")  # 3 nano-USD per second

    assert cost_nanousd(0.5, price) == 2  # 1.5 rounds up
    assert cost_nanousd(0.1, price) == 0  # 0.3 rounds down
    assert cost_nanousd(2.5, Price("y", 3600, False, "v")) == 3  # 2.5 rounds up, not to even
    assert cost_nanousd(3.5, Price("y", 3600, False, "v")) == 4


def test_a_third_of_a_nanodollar_per_second_rounds_only_once() -> None:
    price = Price("x", per_hour_nanousd=1200, spot=False, version="v")  # 1/3 nano-USD per second

    assert cost_nanousd(1.0, price) == 0
    assert cost_nanousd(2.0, price) == 1  # 0.666... rounds up
    assert cost_nanousd(3.0, price) == 1  # exactly 1, with no float drift


def _exact_cost(seconds: float, per_hour: int, policy: BillingPolicy) -> int:
    """The definition, in fractions: the printed seconds, per started step, half up."""
    exact = Fraction(repr(seconds))
    step = Fraction(policy.granularity_seconds)
    if step > 0:
        exact = math.ceil(exact / step) * step
    return max(math.floor(exact * per_hour / 3600 + Fraction(1, 2)), policy.minimum_nanousd)


def test_costs_equal_the_exact_fraction_for_any_time_price_and_policy() -> None:
    rng = random.Random(7)
    policies = [
        BillingPolicy(),
        BillingPolicy(granularity_seconds=Decimal("0.001")),
        BillingPolicy(granularity_seconds=Decimal("0.25"), minimum_nanousd=5),
        BillingPolicy(granularity_seconds=Decimal(60)),
    ]
    for _ in range(2000):
        seconds = rng.choice([rng.random() * 10 ** rng.randint(-7, 6), rng.randint(0, 10**6) / 8])
        per_hour = rng.choice([1, 1200, 710_000_000, rng.randint(0, 10**15)])
        policy = rng.choice(policies)

        cost = cost_nanousd(seconds, Price("x", per_hour, False, "v"), policy)

        assert cost == _exact_cost(seconds, per_hour, policy), (seconds, per_hour, policy)


@pytest.mark.parametrize("seconds", [math.inf, -math.inf, math.nan, -1.0])
def test_a_time_that_is_not_a_finite_non_negative_number_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="finite, non-negative"):
        cost_nanousd(seconds, Price("x", 3600, False, "v"))


def test_the_packaged_catalog_lists_gpu_plus_host_prices_for_every_offering() -> None:
    catalog = PriceCatalog.load()
    expected = {
        "cpu": ("0.05", "0.02"),
        "nvidia-tesla-t4": ("0.54", "0.215"),
        "nvidia-l4": ("0.71", "0.28"),
        "nvidia-tesla-a100": ("3.67", "1.80"),
        "nvidia-h100-80gb": ("10.98", "2.51"),
    }

    for gpu_type, (on_demand, spot) in expected.items():
        assert catalog.price_for(gpu_type).per_hour_nanousd == to_nanousd(on_demand)
        assert catalog.price_for(gpu_type, spot=True).per_hour_nanousd == to_nanousd(spot)
    assert catalog.version == "2026-11-01"


def test_loading_a_path_reads_that_file_instead_of_the_packaged_one(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('version = "9"\n[gpu.cpu]\non_demand_per_hour = "1"\nspot_per_hour = "0.5"\n')

    price = PriceCatalog.load(path).price_for("cpu", spot=True)

    assert price == Price("cpu", 500_000_000, spot=True, version="9")


def test_spot_and_on_demand_prices_differ_and_carry_the_catalog_version() -> None:
    catalog = PriceCatalog.load()

    on_demand = catalog.price_for("nvidia-tesla-a100")
    spot = catalog.price_for("nvidia-tesla-a100", spot=True)

    assert (on_demand.per_hour_nanousd, spot.per_hour_nanousd) == (3_670_000_000, 1_800_000_000)
    assert on_demand.version == spot.version == catalog.version
    assert (on_demand.spot, spot.spot) == (False, True)


def test_an_unknown_gpu_type_has_no_price() -> None:
    with pytest.raises(UnknownPriceError, match="nvidia-rtx-9090"):
        PriceCatalog.load().price_for("nvidia-rtx-9090")


def test_an_unknown_gpu_type_gets_the_default_entry_when_the_catalog_has_one() -> None:
    catalog = PriceCatalog.from_mapping(_catalog(cpu=("0.05", "0.02"), default=("2", "1")))

    price = catalog.price_for("nvidia-rtx-9090", spot=True)

    assert price == Price("default", 1_000_000_000, spot=True, version="v1")
    assert catalog.price_for("cpu").per_hour_nanousd == 50_000_000


def test_a_catalog_with_float_prices_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('version = "1"\n[gpu.cpu]\non_demand_per_hour = 0.1\nspot_per_hour = "0.05"\n')

    with pytest.raises(PriceCatalogError, match="floats lose cents"):
        PriceCatalog.load(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"gpu": {}}, "needs a string 'version'"),
        ({"version": "1", "currency": "EUR", "gpu": {}}, "'EUR' is not USD"),
        ({"version": "1", "gpu": {"cpu": "0.05"}}, "gpu.cpu must be a table"),
        (_catalog(cpu=("0.05", "-1")), "negative"),
        (_catalog(cpu=("0.0000000001", "0")), "finer than a nano-dollar"),
        (_catalog(cpu=("cheap", "0")), "not a decimal amount"),
        (_catalog(cpu=("Infinity", "0")), "not a finite amount"),
    ],
)
def test_a_malformed_catalog_is_refused_with_the_reason(data: dict[str, Any], message: str) -> None:
    with pytest.raises(PriceCatalogError, match=message):
        PriceCatalog.from_mapping(data)


def test_a_catalog_that_is_not_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text("version = \n")

    with pytest.raises(PriceCatalogError, match="not valid TOML"):
        PriceCatalog.load(path)


def test_usd_formatting_is_exact_for_any_number_of_nanodollars() -> None:
    assert format_usd(0) == "$0.000000000"
    assert format_usd(123_456) == "$0.000123456"
    assert format_usd(1) == "$0.000000001"
    assert format_usd(12_345_678_901_234_567_891) == "$12345678901.234567891"


def test_the_policy_bills_started_increments_with_a_minimum() -> None:
    l4 = PriceCatalog.load().price_for("nvidia-l4")  # 710,000,000 nano-USD per hour
    per_second = BillingPolicy(granularity_seconds=Decimal(1))
    with_minimum = BillingPolicy(minimum_nanousd=1_000_000)

    assert cost_nanousd(90.2, l4, per_second) == cost_nanousd(91.0, l4) == 17_947_222
    assert cost_nanousd(0.001, l4, with_minimum) == 1_000_000
    assert cost_nanousd(90.0, l4, with_minimum) == 17_750_000


def test_the_packaged_policy_bills_per_millisecond_with_no_minimum() -> None:
    catalog = PriceCatalog.load()
    l4 = catalog.price_for("nvidia-l4")

    assert catalog.policy == BillingPolicy(granularity_seconds=Decimal("0.001"))
    assert cost_nanousd(0.0001, l4, catalog.policy) == cost_nanousd(0.001, l4)


def test_a_catalog_that_charges_lost_attempts_is_refused() -> None:
    data = {"version": "1", "policy": {"charge_lost_attempts": True}, "gpu": {}}

    with pytest.raises(PriceCatalogError, match="lost attempts are free"):
        PriceCatalog.from_mapping(data)

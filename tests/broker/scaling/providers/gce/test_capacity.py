"""The ``gce`` provider moves on through zones, pricing and GPU types when capacity is short,
and waits for slow operations and boots."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from gpubroker.broker.scaling.backoff import BackoffPolicy
from gpubroker.broker.scaling.providers.base import (
    CapacityError,
    InstanceStatus,
    LaunchRequest,
    ProviderError,
)
from gpubroker.broker.scaling.providers.gce import GceProvider
from tests.fakes.compute import FakeCompute
from tests.support.gce import Fallback
from tests.support.waiting import wait_until

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
    wait_until(lambda: provider.list()[0].status is InstanceStatus.RUNNING, 3.0)


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
    wait_until(lambda: fake.status_of(body["name"]) == "RUNNING", 3.0)
    fake.operation_seconds = 0.0
    provider.terminate(body["name"])
    assert fake.status_of(body["name"]) is None


# -- zone holds ---------------------------------------------------------------------------


def _zones_tried(fake: FakeCompute) -> list[str]:
    return [body["machineType"].split("/")[1] for body in fake.inserted()]


def test_a_zone_that_ran_out_is_tried_last_until_its_hold_ends(
    make_provider: Callable[..., GceProvider], fake: FakeCompute
) -> None:
    now = [0.0]
    provider = make_provider(
        {"backoff": BackoffPolicy(initial_s=30, max_s=900), "clock": lambda: now[0]}
    )
    fake.stockout("zone-a")
    request = LaunchRequest(gpu_types=["nvidia-l4"])

    provider.launch(request)  # zone-a refuses: held for 30 s
    provider.launch(request)  # zone-b straight away
    now[0] = 31.0
    provider.launch(request)  # the hold is over: zone-a first, refused again, held for 60 s

    assert _zones_tried(fake) == ["zone-a", "zone-b", "zone-b", "zone-a", "zone-b"]
    assert [(h.key, h.failures, h.remaining_s(31.0)) for h in provider.zone_holds(31.0)] == [
        (("nvidia-l4", "zone-a"), 2, 60.0)
    ]
    assert provider.zone_holds(91.0) == []


def test_a_held_zone_is_still_tried_when_the_others_refuse(
    make_provider: Callable[..., GceProvider], fake: FakeCompute
) -> None:
    provider = make_provider({"clock": lambda: 0.0})
    fake.stockout("zone-a")
    provider.launch(LaunchRequest(gpu_types=["nvidia-l4"], spot=False))
    fake.stockout("zone-b")

    with pytest.raises(CapacityError):
        provider.launch(LaunchRequest(gpu_types=["nvidia-l4"], spot=False))

    assert _zones_tried(fake) == ["zone-a", "zone-b", "zone-b", "zone-a"]


def test_a_zone_that_creates_a_vm_again_forgets_its_refusals(
    make_provider: Callable[..., GceProvider], fake: FakeCompute
) -> None:
    now = [0.0]
    provider = make_provider({"clock": lambda: now[0]})
    fake.stockout("zone-a", spot=True)
    spot, on_demand = LaunchRequest(["nvidia-l4"]), LaunchRequest(["nvidia-l4"], spot=False)
    provider.launch(spot)  # zone-a refuses Spot: held 30 s

    now[0] = 100.0
    instance = provider.launch(on_demand)  # zone-a first again, and it creates one
    provider.launch(spot)  # zone-a refuses Spot again: a first refusal, held 30 s, not 60

    assert instance.zone == "zone-a"
    assert [(h.failures, h.remaining_s(100.0)) for h in provider.zone_holds(100.0)] == [(1, 30.0)]

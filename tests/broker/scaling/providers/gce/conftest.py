"""Fixtures of the ``gce`` provider tests: a ``FakeCompute`` and providers on real clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.cloud import compute_v1

from gpubroker.broker.scaling.providers.gce import GceProvider
from tests.fakes.compute import FakeCompute
from tests.support.gce import PROJECT, Fallback, anonymous_credentials, make_settings


@pytest.fixture
def fake() -> Iterator[FakeCompute]:
    """The fake Compute Engine API for ``PROJECT``, serving on a free port."""
    with FakeCompute(project=PROJECT, wait_cap_s=0.05) as fake:
        yield fake


@pytest.fixture
def fallbacks() -> list[Fallback]:
    """Every fallback the providers report, in order."""
    return []


@pytest.fixture
def make_provider(
    fake: FakeCompute, fallbacks: list[Fallback]
) -> Iterator[Callable[..., GceProvider]]:
    """Providers on clients this fixture owns and closes; keyword arguments go to settings,
    except ``provider_args`` (the provider's own: ``backoff``, ``clock``)."""
    clients: list[compute_v1.InstancesClient | compute_v1.ZoneOperationsClient] = []

    def make(provider_args: dict[str, Any] | None = None, **overrides: Any) -> GceProvider:
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
            **(provider_args or {}),
        )

    yield make
    for client in clients:
        client.transport.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def provider(make_provider: Callable[..., GceProvider]) -> GceProvider:
    """A provider with the default test settings."""
    return make_provider()

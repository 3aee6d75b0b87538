"""Settings and helpers for tests of the ``gce`` provider against ``FakeCompute``."""

from __future__ import annotations

from typing import Any

from google.auth.credentials import AnonymousCredentials, Credentials

from gpubroker.broker.scaling.providers.gce import GceSettings
from tests.fakes.compute import FakeCompute

PROJECT = "test-project"
ZONES = ("zone-a", "zone-b")
TOKEN = "join-token-s3cret"
Fallback = tuple[str, str, str]
"""(reason, zone, GPU type) of one fallback the provider reported."""


def anonymous_credentials() -> Credentials:
    """Credentials that sign nothing: the fake checks none."""
    return AnonymousCredentials()  # type: ignore[no-untyped-call]


def make_settings(fake: FakeCompute, **overrides: Any) -> GceSettings:
    """Settings for project ``PROJECT`` in ``ZONES``, talking to ``fake``; ``overrides`` win."""
    values: dict[str, Any] = {
        "project": PROJECT,
        "zones": ZONES,
        "broker_address": "broker.example.com:50051",
        "broker_id": "test",
        "join_token": TOKEN,
        "agent_package": "gpubroker[gpu]==0.1.0",
        "api_endpoint": fake.endpoint,
        "credentials": anonymous_credentials(),
        "poll_interval_s": 0.0,
    }
    return GceSettings(**(values | overrides))


def metadata(body: dict[str, Any]) -> dict[str, str]:
    """The metadata items of an instance body, as a dict."""
    return {item["key"]: item["value"] for item in body["metadata"]["items"]}

"""A fake Compute Engine REST API (v1) on loopback: see ``server`` for how tests script it."""

from __future__ import annotations

from tests.fakes.compute.model import RecordedRequest
from tests.fakes.compute.server import FakeCompute

__all__ = ["FakeCompute", "RecordedRequest"]

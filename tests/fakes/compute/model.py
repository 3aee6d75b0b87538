"""The resources of the fake Compute Engine API: VMs, operations, errors and list filters.

``server.FakeCompute`` keeps these and serves them over HTTP with the real API's JSON.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta, timezone
from typing import Any

Json = dict[str, Any]

PREFIX = "/compute/v1/projects/(?P<project>[^/]+)"
ZONE = PREFIX + "/zones/(?P<zone>[^/]+)"
PACIFIC = timezone(timedelta(hours=-7))
# GPUs that accelerator-optimized machine types carry without guestAccelerators.
_IMPLICIT_GPUS = {
    "g2-": "nvidia-l4",
    "a2-highgpu-": "nvidia-tesla-a100",
    "a2-megagpu-": "nvidia-tesla-a100",
    "a2-ultragpu-": "nvidia-a100-80gb",
    "a3-": "nvidia-h100-80gb",
}
_FILTER_TERM = re.compile(
    r'\s*\(?\s*(?P<key>[A-Za-z][\w.-]*)\s*(?P<op>!=|=)\s*(?:"(?P<quoted>[^"]*)"|(?P<bare>[^\s()"]+))'
    r"\s*\)?\s*(?:AND\b)?",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One HTTP request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    body: Json | None


class HttpError(Exception):
    """An error the API answers with: HTTP status and Google's error JSON."""

    def __init__(self, status: int, reason: str, message: str, domain: str = "global") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.domain = domain

    def payload(self) -> Json:
        error = {"message": self.message, "domain": self.domain, "reason": self.reason}
        return {"error": {"code": self.status, "message": self.message, "errors": [error]}}


@dataclass(slots=True)
class Rule:
    """What an insert matching (zone, GPU type, pricing) gets instead of a VM."""

    zone: str | None
    gpu_type: str | None
    spot: bool | None
    http: HttpError | None = None
    """Returned by the insert call itself."""
    operation_error: Json | None = None
    """Put on the insert's operation when it is DONE."""

    def matches(self, zone: str, gpu_type: str, spot: bool) -> bool:
        return (
            self.zone in (None, zone)
            and self.gpu_type in (None, gpu_type)
            and self.spot in (None, spot)
        )


@dataclass(slots=True)
class Vm:
    """A VM: booting through PROVISIONING and STAGING to RUNNING unless its status is forced."""

    zone: str
    resource: Json
    created: float
    boot_s: float
    forced_status: str | None = None

    def status(self) -> str:
        if self.forced_status is not None:
            return self.forced_status
        elapsed = time.monotonic() - self.created
        if elapsed < self.boot_s / 2:
            return "PROVISIONING"
        return "STAGING" if elapsed < self.boot_s else "RUNNING"

    def view(self) -> Json:
        return {**self.resource, "status": self.status()}


@dataclass(slots=True)
class Operation:
    """A zonal operation: done after its scripted polls and time, then runs ``on_done``."""

    resource: Json
    polls_left: int
    done_at: float
    error: Json | None = None
    on_done: Callable[[], object] | None = None

    @property
    def done(self) -> bool:
        return bool(self.resource["status"] == "DONE")


def not_found(resource: str) -> HttpError:
    """The API's 404 for ``resource``."""
    return HttpError(404, "notFound", f"The resource '{resource}' was not found")


def is_insert(path: str) -> bool:
    """Whether ``path`` is the instances collection of a zone (an insert when POSTed)."""
    return re.fullmatch(ZONE + "/instances", path) is not None


def requested_gpu(resource: Json) -> str:
    """The GPU an insert asks for: its guest accelerator, or the one its machine type implies."""
    for accelerator in resource.get("guestAccelerators", []):
        return str(accelerator.get("acceleratorType", "")).rsplit("/", 1)[-1]
    machine_type = str(resource.get("machineType", "")).rsplit("/", 1)[-1]
    for prefix, gpu_type in _IMPLICIT_GPUS.items():
        if machine_type.startswith(prefix):
            return gpu_type
    return "cpu"


def is_spot(resource: Json) -> bool:
    """Whether an instance body asks for the SPOT provisioning model."""
    return bool(resource.get("scheduling", {}).get("provisioningModel") == "SPOT")


def parse_filter(query: str) -> list[tuple[str, str, str]]:
    """``a = "x" AND (labels.b != y)`` -> [(key, op, value)]; 400 for anything else."""
    terms, pos = [], 0
    while query[pos:].strip():
        match = _FILTER_TERM.match(query, pos)
        if match is None or match.end() == pos:
            raise HttpError(
                400,
                "invalid",
                f"Invalid value for field 'filter': '{query}'. Invalid list filter expression.",
            )
        value = match["quoted"] if match["quoted"] is not None else match["bare"]
        terms.append((match["key"], match["op"], value))
        pos = match.end()
    return terms


def holds(resource: Json, key: str, op: str, value: str) -> bool:
    """Whether one filter term (``key op value``, dotted keys) holds for ``resource``."""
    found: Any = resource
    for part in key.split("."):
        found = found.get(part) if isinstance(found, dict) else None
    equal = found is not None and str(found) == value
    return equal if op == "=" else not equal

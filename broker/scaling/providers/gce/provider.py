"""The ``gce`` provider: one Google Compute Engine VM per agent, Spot first, across zones.

Calls are synchronous (``google-cloud-compute`` blocks on HTTP); the autoscaler calls them from a
worker thread.

A zone that refuses a GPU type (stockout or quota) is held for it with exponential backoff
(``backoff.LaunchBackoff``, reset when the zone next creates one): until the hold ends, launches
try it after the zones that are not held, so they do not wait on a refusal that is likely to
come again. When every zone refuses, ``launch`` raises ``CapacityError`` and the autoscaling
loop holds the GPU type itself.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from google.api_core import exceptions as gexc
from google.cloud import compute_v1

from gpubroker.broker.scaling.backoff import BackoffPolicy, Hold, LaunchBackoff
from gpubroker.broker.scaling.providers.base import (
    CapacityError,
    Instance,
    InstanceStatus,
    LaunchRequest,
    ProviderError,
    QuotaError,
    StockoutError,
)
from gpubroker.broker.scaling.providers.gce.settings import GceSettings
from gpubroker.broker.scaling.providers.gce.vm import (
    BROKER_LABEL,
    GPU_LABEL,
    ROLE_LABEL,
    SPOT_LABEL,
    Placement,
    instance_body,
)

__all__ = ["GceProvider"]

logger = logging.getLogger(__name__)

_INSTANCE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")

_STOCKOUT_CODES = frozenset(
    {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "STOCKOUT"}
)
_QUOTA_CODES = frozenset({"QUOTA_EXCEEDED"})
_QUOTA_REASONS = frozenset({"quotaExceeded", "rateLimitExceeded"})
_GONE_CODES = frozenset({"RESOURCE_NOT_FOUND"})
_REQUEST_TIMEOUT_S = 60.0
# zoneOperations.wait returns by about two minutes even when the operation is not done.
_WAIT_TIMEOUT_S = 150.0
_DONE = compute_v1.Operation.Status.DONE

_STATUS = {
    "PENDING": InstanceStatus.PROVISIONING,
    "PROVISIONING": InstanceStatus.PROVISIONING,
    "STAGING": InstanceStatus.STAGING,
    # Being repaired after a host error: down now, expected back.
    "REPAIRING": InstanceStatus.STAGING,
    "RUNNING": InstanceStatus.RUNNING,
    "PENDING_STOP": InstanceStatus.STOPPING,
    "STOPPING": InstanceStatus.STOPPING,
    "SUSPENDING": InstanceStatus.STOPPING,
    # No agent runs in these; the autoscaler should delete them.
    "STOPPED": InstanceStatus.TERMINATED,
    "SUSPENDED": InstanceStatus.TERMINATED,
    "TERMINATED": InstanceStatus.TERMINATED,
}


class GceProvider:
    """Creates, lists and deletes agent VMs on Google Compute Engine.

    Args:
        settings: project, zones, offerings and the agents' bootstrap.
        instances: a ready ``InstancesClient``; built from ``settings`` (REST) when None.
        operations: a ready ``ZoneOperationsClient``; built from ``settings`` when None.
        on_fallback: called as ``(reason, zone, gpu_type)`` each time ``launch`` moves on:
            reason ``stockout`` or ``quota`` (zone refused), or ``spot_exhausted`` (zone ``*``:
            Spot refused everywhere, on-demand next).
        backoff: how long a zone that refused a GPU type is tried last for it.
        clock: monotonic seconds, for the zone holds.
    """

    name = "gce"
    """The provider's name in settings and metrics."""

    def __init__(
        self,
        settings: GceSettings,
        *,
        instances: compute_v1.InstancesClient | None = None,
        operations: compute_v1.ZoneOperationsClient | None = None,
        on_fallback: Callable[[str, str, str], None] | None = None,
        backoff: BackoffPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        options = {"api_endpoint": settings.api_endpoint} if settings.api_endpoint else None
        self._instances = instances or compute_v1.InstancesClient(
            credentials=settings.credentials, transport="rest", client_options=options
        )
        self._operations = operations or compute_v1.ZoneOperationsClient(
            credentials=settings.credentials, transport="rest", client_options=options
        )
        self._on_fallback = on_fallback
        self._clock = clock
        self._backoff: LaunchBackoff[tuple[str, str]] = LaunchBackoff(backoff)
        """(GPU type, zone) -> refusals; guarded by ``_lock`` (launches run on worker threads)."""
        self._lock = threading.Lock()
        self._zones: dict[str, str] = {}
        self.fallbacks: collections.Counter[str] = collections.Counter()
        """Fallbacks so far, by reason (``stockout``, ``quota``, ``spot_exhausted``)."""

    def launch(self, request: LaunchRequest) -> Instance:
        """Creates one agent VM: each GPU type in order, Spot then on-demand, each zone in order.

        Raises:
            CapacityError: every zone refused every GPU type and pricing (stockout or quota).
            ProviderError: any other failure, or none of the GPU types has an offering.
        """
        tried: list[str] = []
        offered = [g for g in request.gpu_types if g in self._settings.offerings]
        if not offered:
            raise ProviderError(
                f"no GCE offering for any of {', '.join(request.gpu_types) or 'no GPU types'}; "
                f"known: {', '.join(sorted(self._settings.offerings))}"
            )
        for gpu_type in offered:
            instance = self._launch_gpu_type(gpu_type, request, tried)
            if instance is not None:
                return instance
        raise CapacityError(f"no GCE capacity; tried {len(tried)}: {'; '.join(tried)}")

    def list(self) -> list[Instance]:
        """Every VM labelled as this broker's, in any zone, TERMINATED ones included.

        A TERMINATED (stopped or suspended) VM runs no agent but still pays for its disk; the
        caller should ``terminate`` it.
        """
        found = [
            _instance_from_gce(inst, _tail(scope))
            for scope, inst in self._aggregated(f'labels.{ROLE_LABEL} = "agent"')
            if inst.labels.get(BROKER_LABEL) == self._settings.broker_id
        ]
        with self._lock:
            self._zones = {i.name: i.zone for i in found}
        return found

    def zone_holds(self, now_s: float) -> builtins.list[Hold[tuple[str, str]]]:
        """The ``(GPU type, zone)`` pairs held at ``now_s`` (on ``clock``), tried last till then."""
        with self._lock:
            return [h for h in self._backoff.holds() if h.remaining_s(now_s) > 0]

    def terminate(self, name: str) -> None:
        """Deletes the VM and waits until it is gone; one that is already gone is fine.

        Raises:
            ProviderError: the delete failed, or ``name`` is not one of this broker's VMs.
        """
        zone = self._zones.get(name) or self._locate(name)
        if zone is None:
            logger.info("instance %s is already gone", name)
            return
        what = f"deleting {name} in {zone}"
        with _translated(what):
            try:
                op = self._instances.delete_unary(
                    project=self._settings.project,
                    zone=zone,
                    instance=name,
                    timeout=_REQUEST_TIMEOUT_S,
                )
            except gexc.NotFound:
                op = None
        if op is not None:
            op = self._wait(zone, op, what)
            codes = {e.code for e in op.error.errors}
            if codes - _GONE_CODES:
                raise _operation_error(op, what)
        logger.info("deleted instance %s in %s", name, zone)
        with self._lock:
            self._zones.pop(name, None)

    def _launch_gpu_type(
        self, gpu_type: str, request: LaunchRequest, tried: builtins.list[str]
    ) -> Instance | None:
        offering = self._settings.offerings[gpu_type]
        for spot in (True, False) if request.spot else (False,):
            for zone in self._zone_order(gpu_type):
                placement = Placement(zone, gpu_type, offering, spot)
                try:
                    instance = self._create(placement, request.max_run_seconds)
                except CapacityError as exc:
                    reason = "quota" if isinstance(exc, QuotaError) else "stockout"
                    tried.append(f"{placement}: {reason}")
                    with self._lock:
                        self._backoff.fail((gpu_type, zone), self._clock(), reason)
                    self._fallback(reason, zone, gpu_type, str(exc))
                    continue
                with self._lock:
                    self._backoff.succeed((gpu_type, zone))
                return instance
            if spot:
                self._fallback("spot_exhausted", "*", gpu_type, "Spot refused in every zone")
        return None

    def _zone_order(self, gpu_type: str) -> builtins.list[str]:
        """The configured zones, those held for ``gpu_type`` last (each group in order)."""
        now_s = self._clock()
        with self._lock:
            waits = {
                z: self._backoff.remaining_s((gpu_type, z), now_s) for z in self._settings.zones
            }
        return sorted(self._settings.zones, key=lambda zone: waits[zone] > 0)

    def _create(self, placement: Placement, max_run_seconds: int | None) -> Instance:
        name = f"gpubroker-{self._settings.broker_id}-{secrets.token_hex(4)}"
        what = f"creating {name}: {placement}"
        request = compute_v1.InsertInstanceRequest(
            project=self._settings.project,
            zone=placement.zone,
            instance_resource=instance_body(self._settings, name, placement, max_run_seconds),
            request_id=str(uuid.uuid4()),
        )
        with _translated(what, capacity=True):
            op = self._instances.insert_unary(request=request, timeout=_REQUEST_TIMEOUT_S)
        # Remember the zone before waiting: should the wait fail, terminate() still finds it.
        with self._lock:
            self._zones[name] = placement.zone
        op = self._wait(placement.zone, op, what)
        if op.error.errors:
            with self._lock:
                self._zones.pop(name, None)
            raise _operation_error(op, what)
        instance = self._get(placement.zone, name, what)
        logger.info("created instance %s: %s, %s", name, placement, instance.status.value)
        return instance

    def _get(self, zone: str, name: str, what: str) -> Instance:
        with _translated(what):
            try:
                inst = self._instances.get(
                    project=self._settings.project,
                    zone=zone,
                    instance=name,
                    timeout=_REQUEST_TIMEOUT_S,
                )
            except gexc.NotFound:
                raise ProviderError(f"{what}: gone right after it was created") from None
        return _instance_from_gce(inst, zone)

    def _wait(self, zone: str, op: compute_v1.Operation, what: str) -> compute_v1.Operation:
        """Waits until ``op`` is DONE (it may carry errors then), or raises ProviderError."""
        deadline = time.monotonic() + self._settings.operation_timeout_s
        while op.status != _DONE:
            started = time.monotonic()
            if started >= deadline:
                raise ProviderError(
                    f"{what}: operation {op.name} not done after "
                    f"{self._settings.operation_timeout_s:g} s"
                )
            with _translated(what):
                op = self._operations.wait(
                    project=self._settings.project,
                    zone=zone,
                    operation=op.name,
                    timeout=_WAIT_TIMEOUT_S,
                )
            pause = self._settings.poll_interval_s - (time.monotonic() - started)
            if op.status != _DONE and pause > 0:
                time.sleep(pause)
        return op

    def _aggregated(self, query: str) -> Iterator[tuple[str, compute_v1.Instance]]:
        request = compute_v1.AggregatedListInstancesRequest(
            project=self._settings.project, filter=query
        )
        with _translated(f"listing instances where {query}"):
            pager = self._instances.aggregated_list(request=request, timeout=_REQUEST_TIMEOUT_S)
            for scope, scoped in pager:
                for inst in scoped.instances:
                    yield scope, inst

    def _locate(self, name: str) -> str | None:
        """The zone of our VM ``name``, or None when there is no such VM."""
        if not _INSTANCE_NAME.fullmatch(name):
            raise ProviderError(f"{name!r} is not a GCE instance name")
        for scope, inst in self._aggregated(f'name = "{name}"'):
            if inst.name != name:
                continue
            owner = inst.labels.get(BROKER_LABEL)
            if owner != self._settings.broker_id:
                raise ProviderError(
                    f"instance {name} belongs to broker {owner!r}, not "
                    f"{self._settings.broker_id!r}; not deleting it"
                )
            return _tail(scope)
        return None

    def _fallback(self, reason: str, zone: str, gpu_type: str, detail: str) -> None:
        logger.warning("GCE fallback (%s) for %s in %s: %s", reason, gpu_type, zone, detail)
        with self._lock:
            self.fallbacks[reason] += 1
        if self._on_fallback is not None:
            self._on_fallback(reason, zone, gpu_type)


@contextlib.contextmanager
def _translated(what: str, *, capacity: bool = False) -> Iterator[None]:
    """Turns Google API and transport errors into ProviderError (or, for an insert, capacity)."""
    try:
        yield
    except gexc.GoogleAPICallError as exc:
        raise (_insert_error(exc, what) if capacity else ProviderError(f"{what}: {exc}")) from exc
    except (gexc.GoogleAPIError, OSError) as exc:
        raise ProviderError(f"{what}: {exc}") from exc


def _insert_error(exc: gexc.GoogleAPICallError, what: str) -> ProviderError:
    """Stockout and quota errors that an insert call itself (not its operation) returns."""
    text = str(exc)
    reasons = {e.get("reason") for e in exc.errors if isinstance(e, dict)} | {exc.reason}
    if any(code in text for code in _STOCKOUT_CODES):
        return StockoutError(f"{what}: {text}")
    if reasons & _QUOTA_REASONS or any(code in text for code in _QUOTA_CODES):
        return QuotaError(f"{what}: {text}")
    return ProviderError(f"{what}: {text}")


def _operation_error(op: compute_v1.Operation, what: str) -> ProviderError:
    """The error a DONE operation reports; stockout and quota become CapacityErrors."""
    codes = {e.code for e in op.error.errors}
    detail = "; ".join(f"{e.code}: {e.message}" for e in op.error.errors)
    if codes & _STOCKOUT_CODES:
        return StockoutError(f"{what}: {detail}")
    if codes & _QUOTA_CODES:
        return QuotaError(f"{what}: {detail}")
    return ProviderError(f"{what}: {detail or 'operation failed'}")


def _instance_from_gce(inst: compute_v1.Instance, zone: str) -> Instance:
    labels = dict(inst.labels)
    spot = inst.scheduling.provisioning_model == "SPOT" or labels.get(SPOT_LABEL) == "true"
    return Instance(
        name=inst.name,
        zone=zone,
        gpu_type=labels.get(GPU_LABEL, "unknown"),
        machine_type=_tail(inst.machine_type),
        spot=spot,
        status=_STATUS.get(inst.status, InstanceStatus.PROVISIONING),
        created_at=_parse_timestamp(inst.creation_timestamp),
        labels=labels,
    )


def _parse_timestamp(text: str) -> datetime:
    """GCE's RFC 3339 ``creationTimestamp`` (``2024-05-01T09:30:00.123-07:00``) in UTC."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        logger.warning("unparsable creationTimestamp %r; using now", text)
        return datetime.now(UTC)
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _tail(url: str) -> str:
    """``zones/us-central1-a`` or a full resource URL -> its last path segment."""
    return url.rstrip("/").rsplit("/", 1)[-1]

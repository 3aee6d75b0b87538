"""The ``gce`` provider: one Google Compute Engine VM per agent, Spot first, across zones.

Every VM is labelled ``gpubroker=agent`` and ``gpubroker-broker=<broker id>`` so that ``list``
finds it again after a broker restart, and several brokers can share a project without adopting
each other's VMs. Every VM also carries ``scheduling.max_run_duration`` (when the request gives
one) with termination action DELETE, so a crashed broker cannot leak it for long.

The VM boots a Deep Learning VM image (NVIDIA driver included) whose ``startup-script`` installs
the agent package into its own Python 3.11 and runs ``python -m gpubroker.gpu_agent`` as a systemd
service
that restarts on failure. The agent's id is the VM's name. The join token travels in its own
metadata key (``gpubroker-join-token``) and reaches the agent through a root-only environment
file; it appears in neither the script nor any log.

Calls are synchronous (``google-cloud-compute`` blocks on HTTP); the autoscaler calls them from a
worker thread.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import logging
import re
import secrets
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

from google.api_core import exceptions as gexc
from google.auth.credentials import Credentials
from google.cloud import compute_v1

from gpubroker.broker.scaling.providers.base import (
    CapacityError,
    Instance,
    InstanceStatus,
    LaunchRequest,
    ProviderError,
    QuotaError,
    StockoutError,
)

__all__ = [
    "BROKER_LABEL",
    "DEFAULT_IMAGE",
    "DEFAULT_OFFERINGS",
    "GPU_LABEL",
    "JOIN_TOKEN_METADATA_KEY",
    "ROLE_LABEL",
    "SPOT_LABEL",
    "GceProvider",
    "GceSettings",
    "GpuOffering",
]

logger = logging.getLogger(__name__)

ROLE_LABEL = "gpubroker"
"""Label every agent VM carries, with the value ``agent``."""
BROKER_LABEL = "gpubroker-broker"
"""Label naming the broker (``GceSettings.broker_id``) that owns the VM."""
GPU_LABEL = "gpubroker-gpu"
"""Label holding the catalog GPU type."""
SPOT_LABEL = "gpubroker-spot"
"""Label holding ``true`` or ``false``."""
JOIN_TOKEN_METADATA_KEY = "gpubroker-join-token"
"""Instance metadata key the startup script reads the join token from."""

DEFAULT_IMAGE = (
    "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-11-py310"
)
"""A Deep Learning VM image family with the NVIDIA driver and CUDA 12.4."""

_IMPLICIT_GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")
_BROKER_ID = re.compile(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?")
_INSTANCE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"[-_a-z0-9]{1,63}")
# Characters that need no quoting in a shell word or a systemd ExecStart line.
_PLAIN_ARG = re.compile(r"[A-Za-z0-9._:/\[\]-]+")
_ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")

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


@dataclass(frozen=True, slots=True)
class GpuOffering:
    """How one catalog GPU type is bought: a machine type, plus attached GPUs where needed."""

    machine_type: str
    """E.g. ``g2-standard-4`` or ``n1-standard-4``."""
    accelerator_type: str = ""
    """GCE accelerator type, e.g. ``nvidia-tesla-t4``; empty for a CPU-only machine."""
    accelerator_count: int = 1
    """GPUs per VM; 0 for a CPU-only machine (its agent runs with ``--device cpu``)."""

    @property
    def has_gpu(self) -> bool:
        """True when the VM has a GPU, attached or built into the machine type."""
        return self.accelerator_count > 0

    @property
    def attaches_accelerators(self) -> bool:
        """True when the GPUs must be sent as ``guest_accelerators`` (N1 + T4, V100 ...).

        Accelerator-optimized machine types (A2, A3, A4, G2, G4) carry their GPUs implicitly.
        """
        return self.has_gpu and not self.machine_type.startswith(_IMPLICIT_GPU_FAMILIES)


DEFAULT_OFFERINGS: Mapping[str, GpuOffering] = MappingProxyType(
    {
        "cpu": GpuOffering("n2-standard-2", accelerator_count=0),
        "nvidia-tesla-t4": GpuOffering("n1-standard-4", "nvidia-tesla-t4"),
        "nvidia-l4": GpuOffering("g2-standard-4", "nvidia-l4"),
        "nvidia-tesla-a100": GpuOffering("a2-highgpu-1g", "nvidia-tesla-a100"),
        "nvidia-a100-80gb": GpuOffering("a2-ultragpu-1g", "nvidia-a100-80gb"),
        "nvidia-h100-80gb": GpuOffering("a3-highgpu-1g", "nvidia-h100-80gb"),
    }
)
"""One machine per catalog GPU type (the names in ``billing/prices.toml``)."""


@dataclass(frozen=True, slots=True)
class GceSettings:
    """Where and how the ``gce`` provider creates agent VMs."""

    project: str
    """Google Cloud project id."""
    zones: tuple[str, ...]
    """Zones to try, in order, for every GPU type and pricing."""
    broker_address: str
    """``host:port`` the agents dial."""
    broker_id: str = "default"
    """Short id (lowercase letters, digits, hyphens; at most 40) in every VM's name and labels."""
    join_token: str | None = field(default=None, repr=False)
    """The broker's agent join token; sent in instance metadata, never logged."""
    agent_package: str = ""
    """What the VM pip-installs: a pinned requirement from an index you control, or a wheel URL
    (e.g. in a bucket). Required: a bare name could install someone else's package, and the VM
    hands the agent its join token."""
    agent_python: str = "3.11"
    """Python version ``uv`` installs for the agent (the image's own Python may be older)."""
    agent_env: Mapping[str, str] = field(default_factory=dict)
    """Extra ``GPUBROKER_AGENT_*`` variables for the agent, e.g. ``GPUBROKER_AGENT_TLS=1``."""
    offerings: Mapping[str, GpuOffering] = field(default_factory=lambda: DEFAULT_OFFERINGS)
    """Catalog GPU type -> machine; GPU types missing here are skipped."""
    image: str = DEFAULT_IMAGE
    """Boot image or image family."""
    boot_disk_gb: int = 100
    """Boot disk size; Deep Learning VM images need at least 50 GB."""
    boot_disk_type: str = "pd-balanced"
    """Boot disk type (A3 and G2 do not take ``pd-standard``)."""
    network: str = "global/networks/default"
    """VPC network."""
    subnetwork: str | None = None
    """Subnetwork (``regions/REGION/subnetworks/NAME``); the network's default when None."""
    external_ip: bool = True
    """Give each VM an ephemeral public IP (without one the VPC needs Cloud NAT for pip)."""
    service_account: str | None = "default"
    """Service account email; ``default`` is the Compute Engine default, None attaches none."""
    scopes: tuple[str, ...] = (
        "https://www.googleapis.com/auth/logging.write",
        "https://www.googleapis.com/auth/monitoring.write",
    )
    """OAuth scopes of the service account."""
    operation_timeout_s: float = 600.0
    """How long one insert or delete may take before it counts as failed."""
    poll_interval_s: float = 1.0
    """Least time between two waits on an operation."""
    api_endpoint: str | None = None
    """Compute API endpoint override (tests: ``http://127.0.0.1:PORT``)."""
    credentials: Credentials | None = field(default=None, repr=False, compare=False)
    """Credentials; Application Default Credentials when None."""

    def __post_init__(self) -> None:
        if not self.project or not self.zones:
            raise ValueError("GCE settings need a project and at least one zone")
        if not self.agent_package:
            raise ValueError(
                "GCE settings need agent_package: the agent wheel's URL or a pinned requirement"
            )
        if not _BROKER_ID.fullmatch(self.broker_id):
            raise ValueError(
                f"broker_id must be 1-40 lowercase letters, digits or inner hyphens, "
                f"not {self.broker_id!r}"
            )
        if not _PLAIN_ARG.fullmatch(self.broker_address):
            raise ValueError(f"broker_address {self.broker_address!r} is not a plain host:port")
        for gpu_type in self.offerings:
            if not _LABEL_VALUE.fullmatch(gpu_type):
                raise ValueError(f"GPU type {gpu_type!r} is not a valid GCE label value")
        for name, value in self.agent_env.items():
            if not _ENV_NAME.fullmatch(name) or "\n" in value:
                raise ValueError(f"agent_env entry {name!r} is not NAME=single-line value")
        if self.boot_disk_gb < 10 or self.operation_timeout_s <= 0 or self.poll_interval_s < 0:
            raise ValueError(
                f"need boot_disk_gb >= 10, operation_timeout_s > 0 and poll_interval_s >= 0, "
                f"got {self.boot_disk_gb}, {self.operation_timeout_s} and {self.poll_interval_s}"
            )


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One (zone, GPU type, pricing) that ``launch`` tries."""

    zone: str
    gpu_type: str
    offering: GpuOffering
    spot: bool

    def __str__(self) -> str:
        pricing = "spot" if self.spot else "on-demand"
        return f"{self.gpu_type} ({self.offering.machine_type}) {pricing} in {self.zone}"


class GceProvider:
    """Creates, lists and deletes agent VMs on Google Compute Engine.

    Args:
        settings: project, zones, offerings and the agents' bootstrap.
        instances: a ready ``InstancesClient``; built from ``settings`` (REST) when None.
        operations: a ready ``ZoneOperationsClient``; built from ``settings`` when None.
        on_fallback: called as ``(reason, zone, gpu_type)`` each time ``launch`` moves on:
            reason ``stockout`` or ``quota`` (zone refused), or ``spot_exhausted`` (zone ``*``:
            Spot refused everywhere, on-demand next).
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
            for zone in self._settings.zones:
                attempt = _Attempt(zone, gpu_type, offering, spot)
                try:
                    return self._create(attempt, request.max_run_seconds)
                except CapacityError as exc:
                    reason = "quota" if isinstance(exc, QuotaError) else "stockout"
                    tried.append(f"{attempt}: {reason}")
                    self._fallback(reason, zone, gpu_type, str(exc))
            if spot:
                self._fallback("spot_exhausted", "*", gpu_type, "Spot refused in every zone")
        return None

    def _create(self, attempt: _Attempt, max_run_seconds: int | None) -> Instance:
        name = f"gpubroker-{self._settings.broker_id}-{secrets.token_hex(4)}"
        what = f"creating {name}: {attempt}"
        request = compute_v1.InsertInstanceRequest(
            project=self._settings.project,
            zone=attempt.zone,
            instance_resource=_instance_body(self._settings, name, attempt, max_run_seconds),
            request_id=str(uuid.uuid4()),
        )
        with _translated(what, capacity=True):
            op = self._instances.insert_unary(request=request, timeout=_REQUEST_TIMEOUT_S)
        # Remember the zone before waiting: should the wait fail, terminate() still finds it.
        with self._lock:
            self._zones[name] = attempt.zone
        op = self._wait(attempt.zone, op, what)
        if op.error.errors:
            with self._lock:
                self._zones.pop(name, None)
            raise _operation_error(op, what)
        instance = self._get(attempt.zone, name, what)
        logger.info("created instance %s: %s, %s", name, attempt, instance.status.value)
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


def _instance_body(
    settings: GceSettings, name: str, attempt: _Attempt, max_run_seconds: int | None
) -> compute_v1.Instance:
    labels = {
        ROLE_LABEL: "agent",
        BROKER_LABEL: settings.broker_id,
        GPU_LABEL: attempt.gpu_type,
        SPOT_LABEL: "true" if attempt.spot else "false",
    }
    offering = attempt.offering
    accelerator = compute_v1.AcceleratorConfig(
        accelerator_type=f"zones/{attempt.zone}/acceleratorTypes/{offering.accelerator_type}",
        accelerator_count=offering.accelerator_count,
    )
    return compute_v1.Instance(
        name=name,
        machine_type=f"zones/{attempt.zone}/machineTypes/{offering.machine_type}",
        guest_accelerators=[accelerator] if offering.attaches_accelerators else [],
        disks=[_boot_disk(settings, attempt.zone, labels)],
        network_interfaces=[_network_interface(settings)],
        service_accounts=_service_accounts(settings),
        scheduling=_scheduling(attempt.spot, max_run_seconds),
        labels=labels,
        metadata=_metadata(settings, name, offering),
    )


def _boot_disk(
    settings: GceSettings, zone: str, labels: Mapping[str, str]
) -> compute_v1.AttachedDisk:
    return compute_v1.AttachedDisk(
        boot=True,
        auto_delete=True,
        initialize_params=compute_v1.AttachedDiskInitializeParams(
            source_image=settings.image,
            disk_size_gb=settings.boot_disk_gb,
            disk_type=f"zones/{zone}/diskTypes/{settings.boot_disk_type}",
            labels=dict(labels),
        ),
    )


def _network_interface(settings: GceSettings) -> compute_v1.NetworkInterface:
    nic = compute_v1.NetworkInterface(network=settings.network)
    if settings.subnetwork:
        nic.subnetwork = settings.subnetwork
    if settings.external_ip:
        nic.access_configs = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
    return nic


def _service_accounts(settings: GceSettings) -> builtins.list[compute_v1.ServiceAccount]:
    if settings.service_account is None:
        return []
    return [compute_v1.ServiceAccount(email=settings.service_account, scopes=settings.scopes)]


def _scheduling(spot: bool, max_run_seconds: int | None) -> compute_v1.Scheduling:
    scheduling = compute_v1.Scheduling(
        on_host_maintenance="TERMINATE",  # GPUs cannot live-migrate
        automatic_restart=False,
        provisioning_model="SPOT" if spot else "STANDARD",
    )
    if spot or max_run_seconds is not None:
        # GCE takes a termination action only for Spot VMs or VMs with a run limit.
        scheduling.instance_termination_action = "DELETE"
    if max_run_seconds is not None:
        scheduling.max_run_duration = compute_v1.Duration(seconds=max_run_seconds)
    return scheduling


def _metadata(settings: GceSettings, name: str, offering: GpuOffering) -> compute_v1.Metadata:
    items = [
        compute_v1.Items(key="startup-script", value=_startup_script(settings, name, offering)),
        # Deep Learning VM images install the NVIDIA driver on first boot when asked to.
        compute_v1.Items(key="install-nvidia-driver", value="True"),
    ]
    if settings.join_token:
        items.append(compute_v1.Items(key=JOIN_TOKEN_METADATA_KEY, value=settings.join_token))
    return compute_v1.Metadata(items=items)


_SCRIPT = """\
#!/bin/bash
# Runs a gpubroker agent on this VM; written by broker.providers.gce. Runs on every boot.
set -euo pipefail
export HOME=/root
export UV_PYTHON_INSTALL_DIR=/opt/gpubroker/python
agent=/opt/gpubroker/venv
if [ ! -f /opt/gpubroker/installed ]; then
  if ! command -v uv >/dev/null; then
    curl -LsSf https://astral.sh/uv/install.sh \\
      | env UV_INSTALL_DIR=/usr/local/bin INSTALLER_NO_MODIFY_PATH=1 sh
  fi
  uv venv --python {python} "$agent"
  uv pip install --python "$agent/bin/python" {package}
  touch /opt/gpubroker/installed
fi

umask 077
cat > /etc/gpubroker-agent.env <<'EOF'
{env}EOF
{token}umask 022
cat > /etc/systemd/system/gpubroker-agent.service <<'EOF'
[Unit]
Description=gpubroker GPU agent
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
EnvironmentFile=/etc/gpubroker-agent.env
ExecStart={exec_start}
Restart=always
RestartSec=5
TimeoutStopSec=25

[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable gpubroker-agent.service
systemctl restart gpubroker-agent.service
"""

_TOKEN_LINES = f"""\
# The join token comes from instance metadata, so it is in neither this script nor its log.
token="$(curl -sSf -H 'Metadata-Flavor: Google' \\
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/{JOIN_TOKEN_METADATA_KEY})"
printf 'GPUBROKER_AGENT_JOIN_TOKEN=%s\\n' "$token" >> /etc/gpubroker-agent.env
unset token
"""


def _startup_script(settings: GceSettings, name: str, offering: GpuOffering) -> str:
    """The bash ``startup-script`` that installs the agent and runs it under systemd."""
    device = "cuda" if offering.has_gpu else "cpu"
    exec_start = (
        f"/opt/gpubroker/venv/bin/python -m gpubroker.gpu_agent --broker {settings.broker_address} "
        f"--agent-id {name} --device {device}"
    )
    env = "".join(
        f'{key}="{_systemd_quoted(value)}"\n' for key, value in settings.agent_env.items()
    )
    return _SCRIPT.format(
        python=shlex.quote(settings.agent_python),
        package=shlex.quote(settings.agent_package),
        env=env,
        token=_TOKEN_LINES if settings.join_token else "",
        exec_start=exec_start,
    )


def _systemd_quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


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

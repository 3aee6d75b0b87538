"""What the ``gce`` provider is configured with: the project and zones, the machine each GPU type
is bought as (``GpuOffering``), and how agent VMs are built and bootstrapped."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.auth.credentials import Credentials

__all__ = ["DEFAULT_IMAGE", "DEFAULT_OFFERINGS", "GceSettings", "GpuOffering"]

DEFAULT_IMAGE = (
    "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-11-py310"
)
"""A Deep Learning VM image family with the NVIDIA driver and CUDA 12.4."""

_IMPLICIT_GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")
_BROKER_ID = re.compile(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"[-_a-z0-9]{1,63}")
# Characters that need no quoting in a shell word or a systemd ExecStart line.
_PLAIN_ARG = re.compile(r"[A-Za-z0-9._:/\[\]-]+")
_ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
# A container image reference: [registry/]repository[:tag][@digest], one shell word.
_IMAGE_REFERENCE = re.compile(r"[a-z0-9][A-Za-z0-9._/:-]*(@sha256:[0-9a-f]{64})?")


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
    (e.g. in a bucket). Required unless ``agent_image`` is set: a bare name could install
    someone else's package, and the VM hands the agent its join token."""
    agent_image: str = ""
    """A container image of the agent (``deploy/docker/agent.Dockerfile``), pinned by tag or
    digest. When set, the VM installs nothing: it runs this image with ``docker run --gpus
    all`` (the boot image needs Docker and the NVIDIA Container Toolkit), and
    ``agent_package`` and ``agent_extra_packages`` must be left out."""
    agent_extra_packages: tuple[str, ...] = ()
    """More requirements the VM installs in the same ``uv pip install`` as ``agent_package``,
    e.g. an operator's workload package; pinned or URLs, for the same reason. One resolve: an
    extra cannot quietly change a version the agent needs."""
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
        self._check_packages()
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

    def _check_packages(self) -> None:
        if self.agent_image:
            self._check_image()
            return
        if not self.agent_package:
            raise ValueError(
                "GCE settings need agent_package: the agent wheel's URL or a pinned requirement"
            )
        _check_requirement("agent_package", self.agent_package)
        if isinstance(self.agent_extra_packages, str):
            raise ValueError(
                f"agent_extra_packages must be a list of requirements, not the string "
                f"{self.agent_extra_packages!r}"
            )
        # TOML gives a list; the field is a tuple so that settings stay immutable.
        object.__setattr__(self, "agent_extra_packages", tuple(self.agent_extra_packages))
        for requirement in self.agent_extra_packages:
            _check_requirement("agent_extra_packages entry", requirement)

    def _check_image(self) -> None:
        if not isinstance(self.agent_image, str) or not _IMAGE_REFERENCE.fullmatch(
            self.agent_image
        ):
            raise ValueError(
                f"agent_image {self.agent_image!r} is not an image reference "
                "(registry/repository:tag or @sha256:digest, one word)"
            )
        if self.agent_package or self.agent_extra_packages:
            raise ValueError(
                "agent_image runs a container and installs no package: leave out agent_package "
                "and agent_extra_packages (build workloads into the image: EXTRA_PACKAGES in "
                "deploy/docker/agent.Dockerfile)"
            )
        object.__setattr__(self, "agent_extra_packages", ())


def _check_requirement(what: str, requirement: object) -> None:
    # A word starting with "-" would reach uv as an option (--index-url ...), not a package.
    if (
        not isinstance(requirement, str)
        or not requirement.strip()
        or requirement.lstrip().startswith("-")
        or any(c in requirement for c in "\n\r\0")
    ):
        raise ValueError(
            f"{what} {requirement!r} is not a pip requirement (a single line, not an option)"
        )

"""Broker settings: one frozen ``Settings``, parsed once in ``__main__`` and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpubroker.broker.storage.spool import DEFAULT_MEMORY_BYTES
from gpubroker.env import env_flag
from gpubroker.protos.wire import DTYPE_ITEMSIZE, MAX_RANK

__all__ = ["Limits", "ModelLimits", "Settings", "parse_api_keys"]


@dataclass(frozen=True, slots=True)
class Limits:
    """What a single task may ask for, and how fast and how far ahead each tenant may submit."""

    max_tensor_bytes: int = 4 << 30
    """Largest single tensor accepted."""
    max_task_bytes: int = 8 << 30
    """Largest sum of a task's input (or output) tensors."""
    max_inputs: int = 64
    """Most input tensors per task."""
    max_params: int = 64
    """Most workload parameters per task."""
    max_priority: int = 100
    """Priorities run from ``-max_priority`` to ``max_priority``."""
    max_attempts: int = 3
    """A task whose agent is lost this many times fails instead of being requeued again."""
    max_rank: int = MAX_RANK
    """Most dimensions per tensor; at most the wire format's ``MAX_RANK``."""
    max_dim: int = 4 << 30
    """Largest single dimension. Bounds even empty tensors, whose bytes a zero dimension hides."""
    allowed_dtypes: frozenset[str] = frozenset(DTYPE_ITEMSIZE)
    """Dtypes tasks may carry; by default every dtype the wire format knows."""
    max_timeout_s: float = 365 * 24 * 3600.0
    """Longest ``timeout_seconds`` a task may ask for."""
    max_queued_per_tenant: int = 100_000
    """Most tasks one tenant may have queued (or being submitted) at once."""
    submit_rate_per_s: float = 2_000.0
    """Tasks per second each tenant may submit, sustained (a token bucket's refill rate);
    every task of a ``RunMany`` batch counts."""
    submit_burst: int = 4_000
    """Tasks a tenant may submit at once above its sustained rate (the bucket's size)."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_rank <= MAX_RANK:
            raise ValueError(f"max_rank {self.max_rank} is outside 0..{MAX_RANK}")
        if unknown := sorted(self.allowed_dtypes - DTYPE_ITEMSIZE.keys()):
            raise ValueError(f"allowed_dtypes names unknown dtypes: {', '.join(unknown)}")
        if not (self.submit_rate_per_s > 0 and self.submit_burst >= 1):
            raise ValueError(
                f"submit_rate_per_s {self.submit_rate_per_s} must be positive and "
                f"submit_burst {self.submit_burst} at least 1"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Limits:
        """Reads the ``GPUBROKER_MAX_*``, ``GPUBROKER_ALLOWED_DTYPES`` and
        ``GPUBROKER_SUBMIT_*`` variables; unset ones keep their defaults."""
        d = cls()
        get = environ.get
        dtypes = get("GPUBROKER_ALLOWED_DTYPES")
        return cls(
            max_tensor_bytes=int(get("GPUBROKER_MAX_TENSOR_BYTES", d.max_tensor_bytes)),
            max_task_bytes=int(get("GPUBROKER_MAX_TASK_BYTES", d.max_task_bytes)),
            max_rank=int(get("GPUBROKER_MAX_RANK", d.max_rank)),
            max_dim=int(get("GPUBROKER_MAX_DIM", d.max_dim)),
            allowed_dtypes=(
                frozenset(filter(None, (t.strip() for t in dtypes.split(","))))
                if dtypes
                else d.allowed_dtypes
            ),
            max_timeout_s=float(get("GPUBROKER_MAX_TIMEOUT_S", d.max_timeout_s)),
            max_queued_per_tenant=int(
                get("GPUBROKER_MAX_QUEUED_PER_TENANT", d.max_queued_per_tenant)
            ),
            submit_rate_per_s=float(get("GPUBROKER_SUBMIT_RATE", d.submit_rate_per_s)),
            submit_burst=int(get("GPUBROKER_SUBMIT_BURST", d.submit_burst)),
        )


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """How many bytes of uploaded models each tenant may hold, and the largest one file."""

    quota_bytes: int = 4 << 30
    """Bytes of model files one tenant may hold (every tenant gets this quota)."""
    max_file_bytes: int = 4 << 30
    """Largest single model file accepted."""

    def __post_init__(self) -> None:
        if self.quota_bytes < 0 or self.max_file_bytes <= 0:
            raise ValueError(
                f"model quota_bytes {self.quota_bytes} must be >= 0 and max_file_bytes "
                f"{self.max_file_bytes} positive"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ModelLimits:
        """Reads ``GPUBROKER_MODEL_QUOTA_MB`` and ``GPUBROKER_MAX_MODEL_MB``."""
        d = cls()
        get = environ.get
        return cls(
            quota_bytes=int(get("GPUBROKER_MODEL_QUOTA_MB", d.quota_bytes >> 20)) << 20,
            max_file_bytes=int(get("GPUBROKER_MAX_MODEL_MB", d.max_file_bytes >> 20)) << 20,
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the broker process is configured with."""

    listen_address: str = "127.0.0.1:50051"
    """Where the gRPC server listens; port 0 picks a free port."""
    database_url: str = "sqlite:///gpubroker-data/broker.db"
    """Any SQLAlchemy URL; the default is a SQLite file beside the spool."""
    spool_dir: Path = Path("gpubroker-data/spool")
    """Where task payloads are written (and fsynced) before a submit is acknowledged."""
    spool_memory_bytes: int = DEFAULT_MEMORY_BYTES
    """Inputs of call-bound tasks (``Run``) held in memory at once; past it they are files."""
    api_keys: Mapping[str, str] = field(default_factory=dict)
    """API key -> tenant. Empty means open mode: every caller is tenant ``default``."""
    join_token: str | None = None
    """Token agents must present; None accepts any agent (local use only)."""
    heartbeat_interval_s: float = 5.0
    """How often agents send heartbeats."""
    lease_timeout_s: float = 15.0
    """An agent silent for this long loses its tasks to the queue."""
    model_affinity_wait_s: float = 2.0
    """How long a queued model task waits for a connected agent that holds its model before
    any agent that may run it takes it; 0 turns model affinity off."""
    limits: Limits = field(default_factory=Limits)
    """Per-task limits."""
    models: ModelLimits = field(default_factory=ModelLimits)
    """Users' models: each tenant's quota and the largest file (files live in
    ``spool_dir/models``)."""
    metrics_address: str | None = None
    """``host:port`` to serve Prometheus ``/metrics`` on; None serves none."""
    migrate: bool = False
    """Upgrade the database schema on start; otherwise refuse to start on an outdated one."""
    failpoint: str | None = None
    """Fault injection for tests: the name of a point where the process kills itself."""
    billing: bool = True
    """Write usage rows. Off only to measure what billing costs (``make bench``)."""
    provider: str = "local"
    """Where agents come from: ``local`` (agent processes on this machine, started on demand),
    ``gce`` (Google Cloud GPU VMs) or ``none`` (agents are started by hand and join)."""
    scaling_config: Path | None = None
    """TOML file with the autoscaling policy and the provider's settings (docs/deploy.md)."""
    tls_cert_file: Path | None = None
    """PEM certificate chain the port serves TLS with (``access.tls``); None means plaintext."""
    tls_key_file: Path | None = None
    """PEM private key of ``tls_cert_file``."""
    tls_client_ca_file: Path | None = None
    """PEM CA that must have signed every caller's certificate (mutual TLS); None asks for none."""
    plaintext: bool = False
    """Allow plaintext on a non-loopback ``listen_address``; without it the broker refuses."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Reads ``GPUBROKER_*`` variables; unset ones keep their defaults.

        Raises:
            ValueError: a variable does not parse.
        """
        defaults = cls()
        get = environ.get
        return cls(
            listen_address=get("GPUBROKER_LISTEN", defaults.listen_address),
            database_url=get("GPUBROKER_DATABASE_URL", defaults.database_url),
            spool_dir=Path(get("GPUBROKER_SPOOL_DIR", str(defaults.spool_dir))),
            spool_memory_bytes=int(
                get("GPUBROKER_SPOOL_MEMORY_MB", str(defaults.spool_memory_bytes >> 20))
            )
            << 20,
            api_keys=parse_api_keys(get("GPUBROKER_API_KEYS", "")),
            join_token=get("GPUBROKER_JOIN_TOKEN") or None,
            heartbeat_interval_s=float(
                get("GPUBROKER_HEARTBEAT_S", str(defaults.heartbeat_interval_s))
            ),
            lease_timeout_s=float(get("GPUBROKER_LEASE_TIMEOUT_S", str(defaults.lease_timeout_s))),
            model_affinity_wait_s=float(
                get("GPUBROKER_MODEL_AFFINITY_WAIT_S", str(defaults.model_affinity_wait_s))
            ),
            metrics_address=get("GPUBROKER_METRICS") or None,
            migrate=env_flag(environ, "GPUBROKER_MIGRATE"),
            failpoint=get("GPUBROKER_FAILPOINT") or None,
            billing=env_flag(environ, "GPUBROKER_BILLING", default=True),
            provider=get("GPUBROKER_PROVIDER", defaults.provider),
            scaling_config=Path(p) if (p := get("GPUBROKER_SCALING_CONFIG")) else None,
            tls_cert_file=Path(p) if (p := get("GPUBROKER_TLS_CERT")) else None,
            tls_key_file=Path(p) if (p := get("GPUBROKER_TLS_KEY")) else None,
            tls_client_ca_file=Path(p) if (p := get("GPUBROKER_TLS_CLIENT_CA")) else None,
            plaintext=env_flag(environ, "GPUBROKER_PLAINTEXT"),
            limits=Limits.from_env(environ),
            models=ModelLimits.from_env(environ),
        )


def parse_api_keys(text: str) -> dict[str, str]:
    """Parses ``"key1=tenant-a,key2=tenant-b"`` into ``{key: tenant}``."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, tenant = item.partition("=")
        if not sep or not key or not tenant:
            raise ValueError(f"API key entry {item!r} is not of the form KEY=TENANT")
        keys[key] = tenant
    return keys

"""Broker settings: one frozen ``Settings``, parsed once in ``__main__`` and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpubroker.broker.access.roles import settings_caller
from gpubroker.broker.storage.retention import RetentionPolicy
from gpubroker.broker.storage.spool import DEFAULT_MEMORY_BYTES, DiskFloor
from gpubroker.env import default_data_dir, env_flag, env_float, env_int
from gpubroker.protos.wire import DTYPE_ITEMSIZE, MAX_RANK

__all__ = [
    "Limits",
    "ModelLimits",
    "Settings",
    "StreamLimits",
    "default_data_dir",
    "parse_api_keys",
    "retention_from_env",
    "spool_floor_from_env",
]


def retention_from_env(environ: Mapping[str, str]) -> RetentionPolicy:
    """Reads ``GPUBROKER_RESULT_TTL_S``, ``GPUBROKER_CALL_RESULT_TTL_S``,
    ``GPUBROKER_SPOOL_SWEEP_S`` and ``GPUBROKER_ORPHAN_GRACE_S``."""
    d = RetentionPolicy()
    return RetentionPolicy(
        result_ttl_s=env_float(environ, "GPUBROKER_RESULT_TTL_S", d.result_ttl_s),
        call_result_ttl_s=env_float(environ, "GPUBROKER_CALL_RESULT_TTL_S", d.call_result_ttl_s),
        sweep_interval_s=env_float(environ, "GPUBROKER_SPOOL_SWEEP_S", d.sweep_interval_s),
        orphan_grace_s=env_float(environ, "GPUBROKER_ORPHAN_GRACE_S", d.orphan_grace_s),
    )


def spool_floor_from_env(environ: Mapping[str, str]) -> DiskFloor:
    """Reads ``GPUBROKER_SPOOL_MIN_FREE_MB`` and ``GPUBROKER_SPOOL_MIN_FREE_PERCENT``."""
    d = DiskFloor()
    return DiskFloor(
        min_free_bytes=env_int(environ, "GPUBROKER_SPOOL_MIN_FREE_MB", d.min_free_bytes >> 20)
        << 20,
        min_free_percent=env_float(environ, "GPUBROKER_SPOOL_MIN_FREE_PERCENT", d.min_free_percent),
    )


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
    """Attempts a task may use of its own: a result the broker could not use (corrupt) is
    retried until then. A workload error fails the task at once, and attempts lost to
    infrastructure count against ``max_lost_attempts`` instead."""
    max_lost_attempts: int = 10
    """A task whose agent is lost this many times (crash, disconnect, silence, drain, broker
    restart) fails as a poison task instead of being requeued again."""
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
        if self.max_attempts < 1 or self.max_lost_attempts < 1:
            raise ValueError(
                f"max_attempts {self.max_attempts} and max_lost_attempts "
                f"{self.max_lost_attempts} must be at least 1"
            )
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
            max_tensor_bytes=env_int(environ, "GPUBROKER_MAX_TENSOR_BYTES", d.max_tensor_bytes),
            max_task_bytes=env_int(environ, "GPUBROKER_MAX_TASK_BYTES", d.max_task_bytes),
            max_rank=env_int(environ, "GPUBROKER_MAX_RANK", d.max_rank),
            max_attempts=env_int(environ, "GPUBROKER_MAX_ATTEMPTS", d.max_attempts),
            max_lost_attempts=env_int(environ, "GPUBROKER_MAX_LOST_ATTEMPTS", d.max_lost_attempts),
            max_dim=env_int(environ, "GPUBROKER_MAX_DIM", d.max_dim),
            allowed_dtypes=(
                frozenset(filter(None, (t.strip() for t in dtypes.split(","))))
                if dtypes
                else d.allowed_dtypes
            ),
            max_timeout_s=env_float(environ, "GPUBROKER_MAX_TIMEOUT_S", d.max_timeout_s),
            max_queued_per_tenant=env_int(
                environ, "GPUBROKER_MAX_QUEUED_PER_TENANT", d.max_queued_per_tenant
            ),
            submit_rate_per_s=env_float(environ, "GPUBROKER_SUBMIT_RATE", d.submit_rate_per_s),
            submit_burst=env_int(environ, "GPUBROKER_SUBMIT_BURST", d.submit_burst),
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
        return cls(
            quota_bytes=env_int(environ, "GPUBROKER_MODEL_QUOTA_MB", d.quota_bytes >> 20) << 20,
            max_file_bytes=env_int(environ, "GPUBROKER_MAX_MODEL_MB", d.max_file_bytes >> 20) << 20,
        )


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """How long a peer may hold the broker: uploads, calls, connections and metadata.

    Uploads are the client streams (``Submit``, ``Run``, ``RunMany``, ``UploadModel``, the
    agents' ``PutResult``); see ``gpubroker.broker.api.limits``.
    """

    upload_idle_timeout_s: float = 30.0
    """An upload that sends no message for this long is cut (RESOURCE_EXHAUSTED)."""
    upload_min_rate_bytes_per_s: int = 8 << 10
    """An upload that, after ``upload_rate_window_s`` of waiting on its peer, received fewer
    bytes per second than this over the last window is cut; 0 turns the check off."""
    upload_rate_window_s: float = 30.0
    """The window ``upload_min_rate_bytes_per_s`` is measured over."""
    max_calls_per_tenant: int = 1_000
    """Calls one tenant may have in flight at once; past it a call is RESOURCE_EXHAUSTED."""
    max_streams_per_connection: int = 1_000
    """HTTP/2 streams (calls) one connection may have open at once (grpc.max_concurrent_streams)."""
    connection_idle_s: float = 300.0
    """A connection with no call for this long is closed (grpc.max_connection_idle_ms)."""
    connection_max_age_s: float = 3_600.0
    """A connection is asked to go away after this long (grpc.max_connection_age_ms); clients
    and agents reconnect for their next call."""
    connection_age_grace_s: float | None = None
    """How long calls still running on a connection past its age may go on
    (grpc.max_connection_age_grace_ms); None lets them finish (an agent's control stream and a
    long ``Run`` live on)."""
    max_metadata_bytes: int = 16 << 10
    """Largest metadata (headers) of a call (grpc.max_metadata_size)."""

    def __post_init__(self) -> None:
        timeouts = (self.upload_idle_timeout_s, self.upload_rate_window_s, self.connection_idle_s)
        if min(*timeouts, self.connection_max_age_s) <= 0 or self.upload_min_rate_bytes_per_s < 0:
            raise ValueError("stream timeouts must be positive and the minimum upload rate >= 0")
        if min(self.max_calls_per_tenant, self.max_streams_per_connection) < 1:
            raise ValueError("max_calls_per_tenant and max_streams_per_connection must be >= 1")
        if self.max_metadata_bytes < 1024:
            raise ValueError(f"max_metadata_bytes {self.max_metadata_bytes} is below 1024")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> StreamLimits:
        """Reads ``GPUBROKER_UPLOAD_*``, ``GPUBROKER_CONNECTION_*``,
        ``GPUBROKER_MAX_CALLS_PER_TENANT``, ``GPUBROKER_MAX_STREAMS_PER_CONNECTION`` and
        ``GPUBROKER_MAX_METADATA_BYTES``; unset ones keep their defaults."""
        d = cls()
        get = environ.get
        grace = get("GPUBROKER_CONNECTION_AGE_GRACE_S")
        return cls(
            upload_idle_timeout_s=env_float(
                environ, "GPUBROKER_UPLOAD_IDLE_TIMEOUT_S", d.upload_idle_timeout_s
            ),
            upload_min_rate_bytes_per_s=int(
                env_float(
                    environ, "GPUBROKER_UPLOAD_MIN_RATE_KIB", d.upload_min_rate_bytes_per_s / 1024
                )
                * 1024
            ),
            upload_rate_window_s=env_float(
                environ, "GPUBROKER_UPLOAD_RATE_WINDOW_S", d.upload_rate_window_s
            ),
            max_calls_per_tenant=env_int(
                environ, "GPUBROKER_MAX_CALLS_PER_TENANT", d.max_calls_per_tenant
            ),
            max_streams_per_connection=env_int(
                environ, "GPUBROKER_MAX_STREAMS_PER_CONNECTION", d.max_streams_per_connection
            ),
            connection_idle_s=env_float(
                environ, "GPUBROKER_CONNECTION_IDLE_S", d.connection_idle_s
            ),
            connection_max_age_s=env_float(
                environ, "GPUBROKER_CONNECTION_MAX_AGE_S", d.connection_max_age_s
            ),
            connection_age_grace_s=(
                env_float(environ, "GPUBROKER_CONNECTION_AGE_GRACE_S", 0) if grace else None
            ),
            max_metadata_bytes=env_int(
                environ, "GPUBROKER_MAX_METADATA_BYTES", d.max_metadata_bytes
            ),
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the broker process is configured with."""

    listen_address: str = "127.0.0.1:50051"
    """Where the gRPC server listens; port 0 picks a free port."""
    database_url: str = field(
        default_factory=lambda: f"sqlite:///{default_data_dir() / 'broker.db'}"
    )
    """Any SQLAlchemy URL; the default is ``broker.db`` in ``default_data_dir()``, beside the
    spool."""
    spool_dir: Path = field(default_factory=lambda: default_data_dir() / "spool")
    """Where task payloads are written (and fsynced) before a submit is acknowledged; the
    default is ``spool`` in ``default_data_dir()``."""
    spool_floor: DiskFloor = field(default_factory=DiskFloor)
    """Free space kept on the spool's filesystem: uploads that would go below are refused."""
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    """How long results stay, and how often the spool is swept of expired results and
    orphaned files."""
    spool_memory_bytes: int = DEFAULT_MEMORY_BYTES
    """Inputs of call-bound tasks (``Run``) held in memory at once; past it they are files."""
    api_keys: Mapping[str, str] = field(default_factory=dict)
    """API key -> ``TENANT`` or ``TENANT:operator`` (an operator key also sees the whole
    broker's status). Empty means open mode: every caller is tenant ``default``."""
    join_token: str | None = None
    """Token agents must present; None accepts any agent (local use only)."""
    heartbeat_interval_s: float = 5.0
    """How often agents send heartbeats."""
    lease_timeout_s: float = 15.0
    """An agent silent for this long loses its tasks to the queue. One silent for 1.5
    heartbeat intervals already gets no new work."""
    reconcile_interval_s: float = 30.0
    """How often the queued and running tasks in the database are compared with the queue and
    the agents' leases in memory, and any difference repaired; 0 turns it off."""
    model_affinity_wait_s: float = 2.0
    """How long a queued model task waits for a connected agent that holds its model before
    any agent that may run it takes it; 0 turns model affinity off."""
    limits: Limits = field(default_factory=Limits)
    """Per-task limits."""
    models: ModelLimits = field(default_factory=ModelLimits)
    """Users' models: each tenant's quota and the largest file (files live in
    ``spool_dir/models``)."""
    streams: StreamLimits = field(default_factory=StreamLimits)
    """How long and how much a peer may hold: uploads, calls, connections, metadata."""
    metrics_address: str | None = None
    """``host:port`` to serve Prometheus ``/metrics`` on; None serves none."""
    metrics_tenants: tuple[str, ...] = ()
    """Tenants that get a ``tenant`` label of their own on ``/metrics`` (the rest: ``other``);
    empty: the first ``metrics_tenant_limit`` tenants seen."""
    metrics_tenant_limit: int = 20
    """Without ``metrics_tenants``, how many tenants get a label of their own."""
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
        data_dir = default_data_dir(environ)
        return cls(
            listen_address=get("GPUBROKER_LISTEN", defaults.listen_address),
            database_url=get("GPUBROKER_DATABASE_URL", f"sqlite:///{data_dir / 'broker.db'}"),
            spool_dir=Path(get("GPUBROKER_SPOOL_DIR", str(data_dir / "spool"))),
            spool_floor=spool_floor_from_env(environ),
            retention=retention_from_env(environ),
            spool_memory_bytes=env_int(
                environ, "GPUBROKER_SPOOL_MEMORY_MB", str(defaults.spool_memory_bytes >> 20)
            )
            << 20,
            api_keys=parse_api_keys(get("GPUBROKER_API_KEYS", "")),
            join_token=get("GPUBROKER_JOIN_TOKEN") or None,
            heartbeat_interval_s=env_float(
                environ, "GPUBROKER_HEARTBEAT_S", str(defaults.heartbeat_interval_s)
            ),
            lease_timeout_s=env_float(
                environ, "GPUBROKER_LEASE_TIMEOUT_S", str(defaults.lease_timeout_s)
            ),
            reconcile_interval_s=env_float(
                environ, "GPUBROKER_RECONCILE_S", str(defaults.reconcile_interval_s)
            ),
            model_affinity_wait_s=env_float(
                environ, "GPUBROKER_MODEL_AFFINITY_WAIT_S", str(defaults.model_affinity_wait_s)
            ),
            metrics_address=get("GPUBROKER_METRICS") or None,
            metrics_tenants=tuple(
                t.strip() for t in get("GPUBROKER_METRICS_TENANTS", "").split(",") if t.strip()
            ),
            metrics_tenant_limit=_at_least_zero(
                "GPUBROKER_METRICS_TENANT_LIMIT",
                get("GPUBROKER_METRICS_TENANT_LIMIT", str(defaults.metrics_tenant_limit)),
            ),
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
            streams=StreamLimits.from_env(environ),
        )


def _at_least_zero(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be at least 0, got {value}")
    return value


def parse_api_keys(text: str) -> dict[str, str]:
    """Parses ``"key1=tenant-a,key2=ops:operator"`` into ``{key: "TENANT[:ROLE]"}``; a role
    other than ``tenant`` or ``operator`` is refused."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, tenant = item.partition("=")
        if not sep or not key or not tenant:
            raise ValueError(f"API key entry {item!r} is not of the form KEY=TENANT[:operator]")
        try:
            settings_caller(tenant)
        except ValueError as exc:
            raise ValueError(f"API key entry for tenant {tenant!r}: {exc}") from None
        keys[key] = tenant
    return keys

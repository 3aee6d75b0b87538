"""Agent settings: one frozen ``Settings``, parsed once in ``__main__`` and passed down."""

from __future__ import annotations

import dataclasses
import os
import random
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubroker.env import env_flag

__all__ = ["DEVICE_CHOICES", "Backoff", "ModelCacheSettings", "Settings", "default_model_dir"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")
"""Values of ``Settings.device``: ``auto`` picks CUDA when present."""

_ENV_PREFIX = "GPUBROKER_AGENT_"


def _default_agent_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


def default_model_dir() -> str:
    """Where model files are kept unless configured: ``~/.cache/gpubroker/models``."""
    return str(Path.home() / ".cache" / "gpubroker" / "models")


@dataclass(frozen=True, slots=True)
class ModelCacheSettings:
    """Where users' model files are kept and how many stay on disk and on the device."""

    directory: str = field(default_factory=default_model_dir)
    """Folder of the model files; it survives restarts (rescanned at start)."""
    disk_bytes: int = 50 << 30
    """Most bytes of model files kept on disk (least recently used go first); a GPU VM's boot
    disk is usually 100 GB or more. The model in use is kept even when it alone is larger."""
    device_bytes: int = 0
    """Most bytes of models kept loaded on the device, by file size; 0: half the device's
    memory (the other half is for activations). At least one model always stays loaded."""

    def __post_init__(self) -> None:
        if not self.directory:
            raise ValueError("the model directory must not be empty")
        if self.disk_bytes < 1 or self.device_bytes < 0:
            raise ValueError(
                f"model disk_bytes must be at least 1 and device_bytes at least 0, "
                f"got {self.disk_bytes} and {self.device_bytes}"
            )


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential reconnect backoff with jitter."""

    initial_s: float = 0.1
    """Delay after the first failure."""
    max_s: float = 5.0
    """Longest delay, before jitter."""
    multiplier: float = 2.0
    """Growth per consecutive failure."""
    jitter: float = 0.2
    """Each delay is scaled by a uniform factor in ``[1 - jitter, 1 + jitter]``."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(
                f"backoff needs 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}"
            )
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(
                f"backoff needs multiplier >= 1 and 0 <= jitter < 1, "
                f"got {self.multiplier} and {self.jitter}"
            )

    def delay_s(
        self, failures: int, uniform: Callable[[float, float], float] = random.uniform
    ) -> float:
        """Seconds to wait after ``failures`` consecutive failed connects (1 for the first)."""
        base = min(self.initial_s * self.multiplier ** max(failures - 1, 0), self.max_s)
        return base * uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the agent process is configured with."""

    broker_address: str = "localhost:50051"
    """host:port of the broker's gRPC server."""
    agent_id: str = field(default_factory=_default_agent_id)
    """Stable id (a VM's name is a good choice); reconnects reuse it."""
    slots: int = 2
    """How many tasks run at once."""
    prefetch: int = 64
    """Most tasks taken beyond ``slots`` and queued here, so a freed slot starts its next task
    at once instead of after a round trip to the broker. How many are actually taken follows
    the task times (``prefetch_horizon_s``, see ``gpubroker.gpu_agent.credit``), but never
    fewer than a batching model's ``max_batch_size`` while one runs, up to this number: it
    bounds the largest batch that single-row tasks can form here."""
    prefetch_horizon_s: float = 0.05
    """The prefetch covers about this much work: many tiny tasks, none of the long ones."""
    device: str = "auto"
    """One of ``DEVICE_CHOICES``."""
    join_token: str | None = None
    """Sent as ``authorization: Bearer <token>`` on every call when set."""
    tls: bool = False
    """Dial the broker over TLS."""
    ca_file: str | None = None
    """PEM file of the CA that signed the broker's certificate; system roots when None."""
    cert_file: str | None = None
    """PEM client certificate for a broker that requires one (mutual TLS); needs ``tls``."""
    key_file: str | None = None
    """PEM private key of ``cert_file``."""
    backoff: Backoff = field(default_factory=Backoff)
    """How long to wait between reconnects."""
    models: ModelCacheSettings = field(default_factory=ModelCacheSettings)
    """The model cache."""
    metrics_address: str | None = None
    """``host:port`` to serve the agent's Prometheus ``/metrics`` on; None serves none."""
    metadata_url: str | None = None
    """The GCE metadata server to watch for preemption; ``off`` watches none; None: the default
    (``preemption.metadata_url``)."""

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"slots must be at least 1, got {self.slots}")
        if self.prefetch < 0 or self.prefetch_horizon_s < 0:
            raise ValueError(
                f"prefetch and prefetch_horizon_s must be at least 0, "
                f"got {self.prefetch} and {self.prefetch_horizon_s}"
            )
        if self.device not in DEVICE_CHOICES:
            raise ValueError(
                f"device must be one of {', '.join(DEVICE_CHOICES)}, not {self.device!r}"
            )
        if not self.broker_address:
            raise ValueError("broker_address must not be empty")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key: set both cert_file and key_file")
        if self.cert_file is not None and not self.tls:
            raise ValueError("a client certificate (cert_file) is only sent over TLS: set tls")

    def with_overrides(self, **values: Any) -> Settings:
        """A copy with the given fields replaced; None values (flags not given) are skipped."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Reads ``GPUBROKER_AGENT_*`` variables; unset ones keep their defaults.

        ``BROKER``, ``ID``, ``SLOTS``, ``PREFETCH``, ``PREFETCH_HORIZON_S``, ``DEVICE``,
        ``JOIN_TOKEN`` (falling back to the broker's ``GPUBROKER_JOIN_TOKEN``), ``TLS``,
        ``CA_FILE``, ``CERT_FILE``, ``KEY_FILE``, ``RECONNECT_INITIAL_S``,
        ``RECONNECT_MAX_S``, ``MODEL_DIR``, ``MODEL_DISK_BYTES``, ``MODEL_DEVICE_BYTES``,
        ``METRICS`` and ``METADATA_URL``,
        each after the ``GPUBROKER_AGENT_`` prefix.

        Raises:
            ValueError: a variable does not parse; the message names it.
        """
        env = {
            k.removeprefix(_ENV_PREFIX): v for k, v in environ.items() if k.startswith(_ENV_PREFIX)
        }
        defaults = cls(agent_id="-")
        backoff = Backoff(
            initial_s=_number(env, "RECONNECT_INITIAL_S", defaults.backoff.initial_s),
            max_s=_number(env, "RECONNECT_MAX_S", defaults.backoff.max_s),
        )
        models = ModelCacheSettings(
            directory=env.get("MODEL_DIR") or defaults.models.directory,
            disk_bytes=int(_number(env, "MODEL_DISK_BYTES", defaults.models.disk_bytes)),
            device_bytes=int(_number(env, "MODEL_DEVICE_BYTES", defaults.models.device_bytes)),
        )
        token = env.get("JOIN_TOKEN") or environ.get("GPUBROKER_JOIN_TOKEN") or None
        return cls(
            broker_address=env.get("BROKER", defaults.broker_address),
            agent_id=env.get("ID") or _default_agent_id(),
            slots=int(_number(env, "SLOTS", defaults.slots)),
            prefetch=int(_number(env, "PREFETCH", defaults.prefetch)),
            prefetch_horizon_s=_number(env, "PREFETCH_HORIZON_S", defaults.prefetch_horizon_s),
            device=env.get("DEVICE", defaults.device),
            join_token=token,
            tls=env_flag(environ, f"{_ENV_PREFIX}TLS"),
            ca_file=env.get("CA_FILE") or None,
            cert_file=env.get("CERT_FILE") or None,
            key_file=env.get("KEY_FILE") or None,
            backoff=backoff,
            models=models,
            metrics_address=env.get("METRICS") or None,
            metadata_url=env.get("METADATA_URL") or None,
        )


def _number(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None:
        return default
    try:
        return int(raw) if isinstance(default, int) else float(raw)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"{_ENV_PREFIX}{key} must be {kind}, got {raw!r}") from None

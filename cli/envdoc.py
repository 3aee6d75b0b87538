"""The environment variables behind the options of the processes' own commands, for their help.

The broker and the agent read their ``GPUBROKER_*`` variables in their ``Settings.from_env``,
not through click, so their options do not know them; these tables name them (and the default
where the option's help does not), and ``adopt`` writes them into the help of the copies that
``gpubroker`` serves. A test checks that every variable named here is read by the module the
table names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import click

__all__ = ["AGENT_ENV", "BILLING_ENV", "SERVE_ENV", "EnvDoc", "documented"]


@dataclass(frozen=True, slots=True)
class EnvDoc:
    """An option's environment variable and, if its help does not say, its default."""

    envvar: str
    default: Callable[[], object] | None = None
    """Computes the default shown (from the process's own ``Settings``, so it stays true)."""


def _serve_default(read: Callable[[Any], object]) -> Callable[[], object]:
    def default() -> object:
        from gpubroker.broker.config import Settings

        return read(Settings())

    return default


def _agent_default(read: Callable[[Any], object]) -> Callable[[], object]:
    def default() -> object:
        from gpubroker.gpu_agent.config import Settings

        return read(Settings(agent_id="-"))

    return default


SERVE_ENV: Mapping[str, EnvDoc] = {
    "listen": EnvDoc("GPUBROKER_LISTEN", _serve_default(lambda s: s.listen_address)),
    "database_url": EnvDoc("GPUBROKER_DATABASE_URL"),
    "data_dir": EnvDoc("GPUBROKER_DATA_DIR"),
    "spool_dir": EnvDoc("GPUBROKER_SPOOL_DIR"),
    "result_ttl": EnvDoc("GPUBROKER_RESULT_TTL_S"),
    "spool_min_free_mb": EnvDoc("GPUBROKER_SPOOL_MIN_FREE_MB"),
    "spool_memory_mb": EnvDoc("GPUBROKER_SPOOL_MEMORY_MB"),
    "model_quota_mb": EnvDoc("GPUBROKER_MODEL_QUOTA_MB"),
    "max_model_mb": EnvDoc("GPUBROKER_MAX_MODEL_MB"),
    "api_keys": EnvDoc("GPUBROKER_API_KEYS"),
    "join_token": EnvDoc("GPUBROKER_JOIN_TOKEN"),
    "heartbeat": EnvDoc(
        "GPUBROKER_HEARTBEAT_S",
        _serve_default(lambda s: s.heartbeat_interval_s),
    ),
    "lease_timeout": EnvDoc(
        "GPUBROKER_LEASE_TIMEOUT_S",
        _serve_default(lambda s: s.lease_timeout_s),
    ),
    "model_affinity_wait": EnvDoc("GPUBROKER_MODEL_AFFINITY_WAIT_S"),
    "metrics_address": EnvDoc("GPUBROKER_METRICS"),
    "migrate": EnvDoc("GPUBROKER_MIGRATE"),
    "provider": EnvDoc(
        "GPUBROKER_PROVIDER",
        _serve_default(lambda s: s.provider),
    ),
    "scaling_config": EnvDoc("GPUBROKER_SCALING_CONFIG"),
    "tls_cert": EnvDoc("GPUBROKER_TLS_CERT"),
    "tls_key": EnvDoc("GPUBROKER_TLS_KEY"),
    "tls_client_ca": EnvDoc("GPUBROKER_TLS_CLIENT_CA"),
    "plaintext": EnvDoc("GPUBROKER_PLAINTEXT"),
}
"""``gpubroker serve``: the variables ``gpubroker.broker.config`` reads, by option."""

AGENT_ENV: Mapping[str, EnvDoc] = {
    "broker_address": EnvDoc(
        "GPUBROKER_AGENT_BROKER",
        _agent_default(lambda s: s.broker_address),
    ),
    "slots": EnvDoc("GPUBROKER_AGENT_SLOTS"),
    "prefetch": EnvDoc("GPUBROKER_AGENT_PREFETCH"),
    "device": EnvDoc("GPUBROKER_AGENT_DEVICE"),
    "agent_id": EnvDoc("GPUBROKER_AGENT_ID"),
    "join_token": EnvDoc("GPUBROKER_AGENT_JOIN_TOKEN, else GPUBROKER_JOIN_TOKEN"),
    "tls": EnvDoc("GPUBROKER_AGENT_TLS"),
    "ca_file": EnvDoc("GPUBROKER_AGENT_CA_FILE"),
    "cert_file": EnvDoc("GPUBROKER_AGENT_CERT_FILE"),
    "key_file": EnvDoc("GPUBROKER_AGENT_KEY_FILE"),
    "model_dir": EnvDoc("GPUBROKER_AGENT_MODEL_DIR"),
    "model_disk_bytes": EnvDoc("GPUBROKER_AGENT_MODEL_DISK_BYTES"),
    "model_device_bytes": EnvDoc("GPUBROKER_AGENT_MODEL_DEVICE_BYTES"),
}
"""``gpubroker agent``: the variables ``gpubroker.gpu_agent.config`` reads, by option."""

BILLING_ENV: Mapping[str, EnvDoc] = {"database_url": EnvDoc("GPUBROKER_DATABASE_URL")}
"""``gpubroker billing`` and ``gpubroker migrate``: read by ``gpubroker.billing.__main__``."""


def documented(param: click.Parameter, docs: Mapping[str, EnvDoc]) -> click.Parameter:
    """A copy of ``param`` whose help names its environment variable (and default), if
    ``docs`` has it; options click reads from the environment itself show theirs."""
    if not isinstance(param, click.Option):
        return param
    param = copy.copy(param)
    if param.envvar and str(param.envvar) not in (param.help or ""):
        param.show_envvar = True
    doc = docs.get(param.name or "")
    if doc is None:
        return param
    extra = [f"env var: {doc.envvar}"]
    help_text = param.help or ""
    if doc.default is not None and "default" not in help_text.lower():
        extra.append(f"default: {doc.default()}")
    param.help = f"{help_text} [{'; '.join(extra)}]".strip()
    return param

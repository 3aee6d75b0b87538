"""``python -m gpubroker.broker``: parse settings, build the server, serve until a signal."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from pathlib import Path
from typing import Any

import click

from gpubroker.broker.config import Settings, parse_api_keys
from gpubroker.broker.errors import ConfigError, SchemaOutdatedError
from gpubroker.broker.scaling.loop import PROVIDERS
from gpubroker.logformat import configure_logging, log_format_option

logger = logging.getLogger("gpubroker.broker")


@click.command()
@click.option("--listen", help="host:port to listen on (port 0 picks one).")
@click.option("--database-url", help="SQLAlchemy URL; default: a SQLite file.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the default database and spool live (default: $XDG_DATA_HOME/gpubroker or "
    "~/.local/share/gpubroker).",
)
@click.option("--spool-dir", type=click.Path(path_type=Path), help="Payload directory.")
@click.option(
    "--result-ttl",
    type=click.FloatRange(min=0),
    help="Seconds a submitted task's result is kept after it finishes (default 604800: 7 days).",
)
@click.option(
    "--spool-min-free-mb",
    type=click.IntRange(min=0),
    help="MiB kept free on the spool's disk: uploads that would go below are refused "
    "(default 1024).",
)
@click.option(
    "--spool-memory-mb",
    type=click.IntRange(min=0),
    help="MiB of Run inputs held in memory instead of files (default 512; 0: none).",
)
@click.option(
    "--model-quota-mb",
    type=click.IntRange(min=0),
    help="MiB of uploaded models each tenant may hold (default 4096).",
)
@click.option(
    "--max-model-mb", type=click.IntRange(min=1), help="Largest model file, MiB (default 4096)."
)
@click.option(
    "--api-keys",
    help="KEY=TENANT[:operator][,...]; an operator key also sees the whole broker's status. "
    "None means open mode.",
)
@click.option("--join-token", help="Token agents must present.")
@click.option("--heartbeat", type=float, help="Agent heartbeat interval, seconds.")
@click.option("--lease-timeout", type=float, help="Seconds of agent silence before requeue.")
@click.option(
    "--model-affinity-wait",
    type=click.FloatRange(min=0),
    help="Seconds a model task waits for an agent holding its model (default 2; 0: off).",
)
@click.option("--metrics", "metrics_address", help="host:port for Prometheus /metrics.")
@click.option("--migrate", is_flag=True, default=None, help="Upgrade the schema on start.")
@click.option(
    "--provider",
    type=click.Choice(PROVIDERS),
    help="Where agents come from: local processes (default), GCE VMs, or none (by hand).",
)
@click.option(
    "--scaling-config",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="TOML file: autoscaling [policy] and the provider's [local] or [gce] table.",
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="PEM certificate chain: serve TLS (see `make certs`).",
)
@click.option(
    "--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Its PEM key."
)
@click.option(
    "--tls-client-ca",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="PEM CA: require every caller (clients and agents) to present a certificate it signed.",
)
@click.option(
    "--plaintext",
    is_flag=True,
    default=None,
    help="Allow plaintext on a non-loopback address (loopback needs no flag).",
)
@click.option(
    "--port-file",
    type=click.Path(path_type=Path),
    envvar="GPUBROKER_PORT_FILE",
    help="Write the bound port here [env: GPUBROKER_PORT_FILE].",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    envvar="GPUBROKER_LOG_LEVEL",
    default="INFO",
    show_default=True,
    help="Least severity logged [env: GPUBROKER_LOG_LEVEL].",
)
@log_format_option
def main(
    listen: str | None,
    database_url: str | None,
    data_dir: Path | None,
    spool_dir: Path | None,
    result_ttl: float | None,
    spool_min_free_mb: int | None,
    spool_memory_mb: int | None,
    model_quota_mb: int | None,
    max_model_mb: int | None,
    api_keys: str | None,
    join_token: str | None,
    heartbeat: float | None,
    lease_timeout: float | None,
    model_affinity_wait: float | None,
    metrics_address: str | None,
    migrate: bool | None,
    provider: str | None,
    scaling_config: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    plaintext: bool | None,
    port_file: Path | None,
    log_level: str,
    log_format: str,
) -> None:
    """Runs the GPU broker. Flags override GPUBROKER_* environment variables."""
    try:
        configure_logging(log_level, log_format)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--log-level") from exc
    overrides: dict[str, Any] = {
        "listen_address": listen,
        "database_url": database_url,
        "spool_dir": spool_dir,
        "spool_memory_bytes": None if spool_memory_mb is None else spool_memory_mb << 20,
        "api_keys": parse_api_keys(api_keys) if api_keys is not None else None,
        "join_token": join_token,
        "heartbeat_interval_s": heartbeat,
        "lease_timeout_s": lease_timeout,
        "model_affinity_wait_s": model_affinity_wait,
        "migrate": migrate,
        "metrics_address": metrics_address,
        "provider": provider,
        "scaling_config": scaling_config,
        "tls_cert_file": tls_cert,
        "tls_key_file": tls_key,
        "tls_client_ca_file": tls_client_ca,
        "plaintext": plaintext,
    }
    try:
        environment = Settings.from_env(_with_data_dir(data_dir))
    except ValueError as exc:  # a GPUBROKER_* variable that does not parse: one line, no traceback
        raise click.UsageError(str(exc)) from exc
    settings = dataclasses.replace(
        environment, **{k: v for k, v in overrides.items() if v is not None}
    )
    settings = _with_spool_flags(settings, result_ttl, spool_min_free_mb)
    if model_quota_mb is not None or max_model_mb is not None:
        models = settings.models
        settings = dataclasses.replace(
            settings,
            models=dataclasses.replace(
                models,
                quota_bytes=models.quota_bytes if model_quota_mb is None else model_quota_mb << 20,
                max_file_bytes=(
                    models.max_file_bytes if max_model_mb is None else max_model_mb << 20
                ),
            ),
        )
    try:
        asyncio.run(_serve(settings, port_file))
    except (SchemaOutdatedError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc


def _with_data_dir(data_dir: Path | None) -> dict[str, str]:
    """The environment, with ``--data-dir`` in place of ``GPUBROKER_DATA_DIR`` when given."""
    environ = dict(os.environ)
    if data_dir is not None:
        environ["GPUBROKER_DATA_DIR"] = str(data_dir)
    return environ


def _with_spool_flags(
    settings: Settings, result_ttl: float | None, spool_min_free_mb: int | None
) -> Settings:
    if result_ttl is not None:
        retention = dataclasses.replace(settings.retention, result_ttl_s=result_ttl)
        settings = dataclasses.replace(settings, retention=retention)
    if spool_min_free_mb is not None:
        floor = dataclasses.replace(settings.spool_floor, min_free_bytes=spool_min_free_mb << 20)
        settings = dataclasses.replace(settings, spool_floor=floor)
    return settings


async def _serve(settings: Settings, port_file: Path | None) -> None:
    # Imported (and grpc with it) only now: the C core reads GRPC_VERBOSITY as it loads.
    from gpubroker.broker.server import create_server

    running = await create_server(settings)
    if port_file is not None:
        port_file.write_text(f"{running.port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        logger.info("shutting down")
    finally:
        await running.stop(grace=2.0)


if __name__ == "__main__":
    main()

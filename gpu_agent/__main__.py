"""``python -m gpubroker.gpu_agent --broker HOST:PORT``: run a broker's workloads until told to
stop.

The first SIGTERM or SIGINT drains (no new work; in-flight attempts finish and upload, then
the process exits 0); a second one exits at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal

import click

from gpubroker.gpu_agent.agent import Agent, agent_version
from gpubroker.gpu_agent.config import DEVICE_CHOICES, ModelCacheSettings, Settings
from gpubroker.gpu_agent.errors import JoinRefusedError, WorkloadLoadError
from gpubroker.gpu_agent.metrics import AgentMetrics
from gpubroker.gpu_agent.nvml import GpuProbe
from gpubroker.gpu_agent.preemption import PREEMPTED, PreemptionWatcher
from gpubroker.gpu_agent.preemption import metadata_url as default_metadata_url
from gpubroker.gpu_agent.runner import Runner, detect_device, favour_workload_threads
from gpubroker.httpserver import HttpServer, metrics_handler, split_address
from gpubroker.logformat import configure_logging, log_format_option

__all__ = ["main"]

logger = logging.getLogger("gpubroker.gpu_agent")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--broker", "broker_address", metavar="HOST:PORT", help="The broker's address.")
@click.option("--slots", type=click.IntRange(min=1), help="Tasks to run at once [default: 2].")
@click.option(
    "--prefetch",
    type=click.IntRange(min=0),
    help="Most tasks queued here beyond --slots, so a slot never waits on the broker; the "
    "number taken follows task times [default: 32].",
)
@click.option("--device", type=click.Choice(DEVICE_CHOICES), help="Where to run [default: auto].")
@click.option("--agent-id", help="Stable agent id [default: hostname-<random>].")
@click.option("--join-token", help="The broker's agent join token.")
@click.option("--tls", is_flag=True, default=None, help="Dial the broker over TLS.")
@click.option("--ca-file", help="PEM CA that signed the broker's certificate [default: system].")
@click.option("--cert-file", help="PEM client certificate, for a broker that requires one (mTLS).")
@click.option("--key-file", help="PEM private key of --cert-file.")
@click.option(
    "--model-dir",
    help="Folder of users' model files, kept across restarts [default: ~/.cache/gpubroker/models].",
)
@click.option(
    "--model-disk-bytes",
    type=click.IntRange(min=1),
    help="Most bytes of model files kept on disk, least recently used out first [default: 50 GiB].",
)
@click.option(
    "--model-device-bytes",
    type=click.IntRange(min=0),
    help="Most bytes of models (by file size) kept loaded on the device; 0: half its memory "
    "[default: 0].",
)
@click.option(
    "--metadata-url",
    help="GCE metadata server to watch for preemption; 'off' disables "
    "[env: GPUBROKER_AGENT_METADATA_URL; default: $GCE_METADATA_HOST or "
    "metadata.google.internal, if it answers].",
)
@click.option(
    "--metrics",
    "metrics_address",
    metavar="HOST:PORT",
    help="Serve the agent's Prometheus /metrics here (slots, model cache, GPU) "
    "[env: GPUBROKER_AGENT_METRICS; default: off].",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@log_format_option
def main(
    broker_address: str | None,
    slots: int | None,
    prefetch: int | None,
    device: str | None,
    agent_id: str | None,
    join_token: str | None,
    tls: bool | None,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    model_dir: str | None,
    model_disk_bytes: int | None,
    model_device_bytes: int | None,
    metadata_url: str | None,
    metrics_address: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Runs a GPU agent. Flags override the GPUBROKER_AGENT_* environment variables."""
    configure_logging(log_level, log_format)
    try:
        settings = Settings.from_env(os.environ).with_overrides(
            broker_address=broker_address,
            slots=slots,
            prefetch=prefetch,
            device=device,
            agent_id=agent_id,
            join_token=join_token,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            metrics_address=metrics_address,
            metadata_url=metadata_url,
        )
        models = _overridden(
            settings.models,
            directory=model_dir,
            disk_bytes=model_disk_bytes,
            device_bytes=model_device_bytes,
        )
        settings = dataclasses.replace(settings, models=models)
        if settings.metrics_address:
            split_address(settings.metrics_address)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    favour_workload_threads()
    try:
        runner = Runner(detect_device(settings.device), settings.slots)
    except (ValueError, WorkloadLoadError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        chosen = settings.metadata_url
        watch = None if chosen == "off" else (chosen or default_metadata_url())
        asyncio.run(_serve(settings, runner, watch))
    except JoinRefusedError:
        raise SystemExit(1) from None  # logged, in the chosen log format, as it happened
    finally:
        runner.close()


def _overridden(
    settings: ModelCacheSettings,
    directory: str | None,
    disk_bytes: int | None,
    device_bytes: int | None,
) -> ModelCacheSettings:
    return ModelCacheSettings(
        directory=settings.directory if directory is None else directory,
        disk_bytes=settings.disk_bytes if disk_bytes is None else disk_bytes,
        device_bytes=settings.device_bytes if device_bytes is None else device_bytes,
    )


async def _serve(settings: Settings, runner: Runner, metadata_url: str | None) -> None:
    info = runner.device
    logger.info(
        "agent %s: %s (%s, %d bytes), %d slots, workloads %s",
        settings.agent_id,
        info.device,
        info.gpu_type,
        info.memory_bytes,
        runner.slots,
        ", ".join(sorted(runner.workloads)),
    )
    logger.info(
        "warmed up the workloads on %d threads in %.2f s", runner.slots, await runner.warm_up()
    )
    agent = Agent(settings, runner)
    http = _metrics_server(settings.metrics_address, agent)
    stopping: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum, agent, stopping)
    watcher = PreemptionWatcher(metadata_url, lambda kind, value: _on_notice(agent, kind, value))
    watcher.start()
    try:
        await agent.run()
        await asyncio.gather(*stopping)
    finally:
        await watcher.stop()
        if http is not None:
            http.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    logger.info("agent stopped")


def _metrics_server(address: str | None, agent: Agent) -> HttpServer | None:
    """Serves the agent's ``/metrics`` at ``address``; None when not asked to."""
    if not address:
        return None
    metrics = AgentMetrics(agent, agent_version(), GpuProbe.open(agent.runner.device.device))
    http = HttpServer(address, asyncio.get_running_loop())
    http.add_route("/metrics", metrics_handler(metrics.registry))
    try:
        port = http.start()
    except OSError as exc:
        raise click.ClickException(f"--metrics {address}: {exc}") from exc
    logger.info("serving /metrics on %s:%d", split_address(address)[0], port)
    return http


async def _on_notice(agent: Agent, kind: str, value: str) -> None:
    await agent.leave("preempted" if kind == PREEMPTED else f"host maintenance: {value}")


def _on_signal(signum: int, agent: Agent, stopping: list[asyncio.Task[None]]) -> None:
    if stopping:
        logger.warning("second %s: exiting now", signal.Signals(signum).name)
        logging.shutdown()
        # Worker threads cannot be interrupted, and interpreter exit would join them: skip it.
        os._exit(128 + signum)
    logger.info("%s: draining, then exiting", signal.Signals(signum).name)
    stopping.append(asyncio.get_running_loop().create_task(agent.stop()))


if __name__ == "__main__":
    main()

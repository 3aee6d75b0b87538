"""``python -m gpu_agent --broker HOST:PORT``: run workloads for a broker until told to stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from typing import Any

import click

from gpu_agent.agent import Agent
from gpu_agent.config import Settings
from gpu_agent.runner import Runner, detect_device

logger = logging.getLogger("gpu_agent")


@click.command()
@click.option("--broker", "broker_address", help="host:port of the broker.")
@click.option("--agent-id", help="Stable agent id (default: hostname + random suffix).")
@click.option("--slots", type=click.IntRange(min=1), help="Tasks to run at once.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run.")
@click.option("--join-token", help="The broker's agent join token.")
@click.option("--log-level", default="INFO", show_default=True)
def main(
    broker_address: str | None,
    agent_id: str | None,
    slots: int | None,
    device: str | None,
    join_token: str | None,
    log_level: str,
) -> None:
    """Runs a GPU agent. Flags override GPUBROKER_AGENT_* environment variables."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, Any] = {
        "broker_address": broker_address,
        "agent_id": agent_id,
        "slots": slots,
        "device": device,
        "join_token": join_token,
    }
    settings = dataclasses.replace(
        Settings.from_env(), **{k: v for k, v in overrides.items() if v is not None}
    )
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    info = detect_device(settings.device)
    logger.info(
        "agent %s on %s (%s), %d slots",
        settings.agent_id,
        info.device,
        info.gpu_type,
        settings.slots,
    )
    runner = Runner(info, settings.slots)
    agent = Agent(settings, runner)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            logger.warning("second signal: exiting now")
            raise SystemExit(1)
        logger.info("draining: finishing in-flight tasks, taking no new ones")
        task = loop.create_task(agent.stop())
        task.add_done_callback(lambda _: None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await agent.run()
    finally:
        runner.close()
    logger.info("agent stopped")


if __name__ == "__main__":
    main()

"""Dynamic batching: many single-row requests to one small model, batching off vs on.

One broker and one agent (one slot: one device). The model is small (6 MB: 300 blocks of a
64-wide linear layer, LayerNorm and GELU) and its call is bound by per-operator overhead, not
arithmetic: about 19 ms for one row and 23 ms for sixteen on this CPU. A small model on a GPU is
bound the same way, by kernel launches, which is why batching is where its throughput is. The
same model is uploaded with batching off and on (a header-only update: its bytes are sent
once), and the two settings alternate, off/on/on/off..., so drift hits both alike.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import torch
from torch import nn

from bench.harness import broker_env, median, percentile
from bench.scenarios import Row
from gpubroker.client import AsyncClient, Client, Model
from tests.support.cluster import AgentProcess, BrokerProcess

__all__ = ["batching"]

FEATURES = 64
BLOCKS = 300


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(FEATURES, FEATURES), nn.LayerNorm(FEATURES), nn.GELU()]
    return nn.Sequential(*layers).eval()


def batching(root: Path, requests: int, callers: int, reps: int, max_batch: int = 32) -> list[Row]:
    """``requests`` single-row runs from ``callers`` concurrent callers, batching off vs on."""
    root.mkdir(parents=True, exist_ok=True)
    broker = BrokerProcess(root, heartbeat_s=5.0, lease_timeout_s=15.0, env=broker_env()).start()
    agent = AgentProcess(
        root, broker.address, "batching-agent", slots=1, extra_args=("--prefetch", str(callers))
    ).start()
    module = _model()
    example = (torch.randn(4, FEATURES),)
    try:
        with Client(broker.address, "key-a") as client:
            settings = {"off": (0, 0.0), "on": (max_batch, 0.002)}

            def upload(mode: str) -> Model:
                size, delay = settings[mode]
                return client.upload_model(
                    module,
                    example,
                    name="bench-mlp",
                    batch_dim_varies=True,
                    max_batch_size=size,
                    max_queue_delay=delay,
                )

            for mode in settings:  # warm: model fetched and resident, both paths run
                model = upload(mode)
                asyncio.run(_burst(broker.address, model, callers * 4, callers))
            results: dict[str, list[tuple[float, list[float]]]] = {"off": [], "on": []}
            for i in range(reps):
                for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    model = upload(mode)
                    results[mode].append(
                        asyncio.run(_burst(broker.address, model, requests, callers))
                    )
    finally:
        agent.stop()
        broker.stop()
    rows = []
    for metric, unit, pick, higher in (
        ("throughput", "req/s", lambda r: requests / r[0], True),
        ("latency p50", "ms", lambda r: percentile(r[1], 50) * 1e3, False),
        ("latency p99", "ms", lambda r: percentile(r[1], 99) * 1e3, False),
    ):
        on = median([pick(r) for r in results["on"]])
        off = median([pick(r) for r in results["off"]])
        rows.append(
            Row(
                f"batching on | off ({requests} x 1 row, {callers} callers)",
                metric,
                unit,
                on,
                off,
                higher,
            )
        )
    return rows


async def _burst(
    address: str, model: Model, requests: int, callers: int
) -> tuple[float, list[float]]:
    """Runs ``requests`` single-row tasks from ``callers`` coroutines; (seconds, latencies)."""
    rows = torch.randn(requests, 1, FEATURES)
    latencies: list[float] = []
    next_index = iter(range(requests))
    async with AsyncClient(address, "key-a") as client:

        async def caller() -> None:
            for i in next_index:
                started = time.perf_counter()
                await client.run(model, [rows[i]], timeout=120)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return time.perf_counter() - started, latencies

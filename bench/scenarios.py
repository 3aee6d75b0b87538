"""The benchmark scenarios. Each returns result rows: one metric, broker vs direct, and the ratio.

Broker and direct runs alternate (A/B/A/B...) inside one scenario so drift on a noisy machine
hits both alike; figures are medians.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
import torch

from bench.harness import Stack, median, percentile, rss_bytes, stack
from bench.ledger import ledger_cost_us
from gpubroker.billing.models import tasks
from gpubroker.client import AsyncClient, Client
from tests.support.cluster import AgentProcess
from tests.support.waiting import wait_until

__all__ = ["Row", "billing_overhead", "large_tensors", "queue_depth", "tiny_tasks"]

_T = TypeVar("_T")

MIB = 1 << 20
TARGETS = ("broker", "direct")


@dataclass(frozen=True, slots=True)
class Row:
    """One reported figure."""

    scenario: str
    metric: str
    unit: str
    broker: float
    direct: float | None = None
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        """broker / direct (for costs: direct / broker), so 1.0 means 'as good as direct'."""
        if self.direct is None or self.direct == 0 or self.broker == 0:
            return None
        return self.broker / self.direct if self.higher_is_better else self.direct / self.broker


def _alternate(reps: int, fn: Callable[[str], _T]) -> dict[str, list[_T]]:
    results: dict[str, list[_T]] = {t: [] for t in TARGETS}
    for i in range(reps):
        for target in TARGETS if i % 2 == 0 else reversed(TARGETS):
            results[target].append(fn(target))
    return results


def large_tensors(root: Path, sizes_mib: list[int], chunk_kib: list[int], reps: int) -> list[Row]:
    """(a) echo round trips of large tensors at several chunk sizes."""
    rows: list[Row] = []
    with stack(root / "large") as s:
        for size in sizes_mib:
            tensor = torch.randn(size * MIB // 4)
            for chunk in chunk_kib if size <= 64 else [1024]:
                results = _alternate(reps, _bind_round_trip(s, tensor, chunk * 1024))
                gb = size * MIB / 1e9
                mbps = {t: median([size * MIB / 1e6 / w for w, _ in r]) for t, r in results.items()}
                cpu = {t: median([c / gb for _, c in r]) for t, r in results.items()}
                label = f"{size} MiB, {chunk} KiB chunks"
                rows.append(
                    Row(
                        "large tensor",
                        f"{label}: round trip",
                        "MB/s",
                        mbps["broker"],
                        mbps["direct"],
                    )
                )
                rows.append(
                    Row(
                        "large tensor",
                        f"{label}: CPU",
                        "CPU s/GB",
                        cpu["broker"],
                        cpu["direct"],
                        False,
                    )
                )
    return rows


def _bind_round_trip(
    s: Stack, tensor: torch.Tensor, chunk_bytes: int
) -> Callable[[str], tuple[float, float]]:
    return lambda target: _round_trip(s, target, tensor, chunk_bytes)


def _round_trip(
    s: Stack, target: str, tensor: torch.Tensor, chunk_bytes: int
) -> tuple[float, float]:
    with Client(s.address(target), "key-a", chunk_bytes=chunk_bytes) as client:
        client.run("echo", [tensor[:4]], timeout=60)
        with s.measure(target) as m:
            result = client.run("echo", [tensor], timeout=600)
    assert result.output.shape == tensor.shape
    return m.wall_s, m.cpu_s


def tiny_tasks(
    root: Path, sequential: int, per_client: int, clients: int, reps: int, mapped: int
) -> list[Row]:
    """(b) echo of a few bytes: sequential latency, and throughput with 1 and N clients, task
    by task (``run``) and batched on one call per client (``map``, ``mapped`` tasks each)."""
    payload = torch.arange(4, dtype=torch.float32)
    with stack(root / "tiny") as s:
        seq = {
            t: r[0]
            for t, r in _alternate(1, lambda t: _latencies(s, t, payload, sequential)).items()
        }
        many = _alternate(reps, lambda t: _throughput(s, t, payload, clients, per_client))
        batched = _alternate(reps, lambda t: _map_throughput(s, t, payload, clients, mapped))
    tput = {t: median([rate for rate, _ in r]) for t, r in many.items()}
    cpu = {t: median([ms for _, ms in r]) for t, r in many.items()}
    map_tput = {t: median([rate for rate, _ in r]) for t, r in batched.items()}
    map_cpu = {t: median([ms for _, ms in r]) for t, r in batched.items()}
    return [
        Row("tiny task", "1 client: latency p50", "ms", seq["broker"][0], seq["direct"][0], False),
        Row("tiny task", "1 client: latency p99", "ms", seq["broker"][1], seq["direct"][1], False),
        Row(
            "tiny task",
            "1 client: throughput",
            "tasks/s",
            1e3 / seq["broker"][2],
            1e3 / seq["direct"][2],
        ),
        Row(
            "tiny task", f"{clients} clients: throughput", "tasks/s", tput["broker"], tput["direct"]
        ),
        Row(
            "tiny task",
            f"{clients} clients: CPU",
            "CPU ms/task",
            cpu["broker"],
            cpu["direct"],
            False,
        ),
        Row(
            "tiny task",
            f"{clients} clients, map: throughput",
            "tasks/s",
            map_tput["broker"],
            map_tput["direct"],
        ),
        Row(
            "tiny task",
            f"{clients} clients, map: CPU",
            "CPU ms/task",
            map_cpu["broker"],
            map_cpu["direct"],
            False,
        ),
    ]


def _latencies(s: Stack, target: str, payload: torch.Tensor, n: int) -> tuple[float, float, float]:
    """Returns (p50 ms, p99 ms, mean ms) of ``n`` back-to-back tasks."""
    with Client(s.address(target), "key-a") as client:
        for _ in range(5):
            client.run("echo", [payload], timeout=60)
        samples = []
        with s.measure(target) as m:
            for _ in range(n):
                start = time.perf_counter()
                client.run("echo", [payload], timeout=60)
                samples.append(time.perf_counter() - start)
    mean_ms = m.wall_s / n * 1e3
    return percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3, mean_ms


def _throughput(
    s: Stack, target: str, payload: torch.Tensor, clients: int, per_client: int
) -> tuple[float, float]:
    """Returns (tasks/s, CPU ms per task) of ``clients`` threads running tasks back to back."""

    def run(client: Client, n: int) -> None:
        for _ in range(n):
            client.run("echo", [payload], timeout=60)

    return _clients(s, target, clients, per_client, run)


def _map_throughput(
    s: Stack, target: str, payload: torch.Tensor, clients: int, per_client: int
) -> tuple[float, float]:
    """Like ``_throughput``, but each client sends its tasks with ``Client.map`` on one call."""

    def run(client: Client, n: int) -> None:
        assert len(list(client.map("echo", [payload] * n))) == n

    return _clients(s, target, clients, per_client, run)


def _clients(
    s: Stack, target: str, clients: int, per_client: int, run: Callable[[Client, int], None]
) -> tuple[float, float]:
    """``clients`` threads each warm up, wait for the others, then ``run(client, per_client)``;
    returns (tasks/s, CPU ms per task) over the timed part."""
    address = s.address(target)
    barrier = threading.Barrier(clients + 1)

    def work() -> None:
        with Client(address, "key-a") as client:
            run(client, 3)
            barrier.wait()
            run(client, per_client)

    threads = [threading.Thread(target=work) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    with s.measure(target) as m:
        for thread in threads:
            thread.join()
    total = clients * per_client
    return total / m.wall_s, m.cpu_s / total * 1e3


def queue_depth(root: Path, n: int, concurrency: int) -> list[Row]:
    """(c) n tasks queued with no agent: submit rate, memory per queued task, dispatch rate."""
    with stack(root / "queue", direct=False) as s:
        s.agent.stop()
        rss0 = rss_bytes(s.pids("broker")[0])
        start = time.perf_counter()
        asyncio.run(_submit_many(s.broker.address, n, concurrency))
        submit_s = time.perf_counter() - start
        assert s.broker.proc is not None
        per_task = (rss_bytes(s.broker.proc.pid) - rss0) / n
        agent = AgentProcess(s.root, s.broker.address, "drain", slots=8).start()
        s.extra.append(agent)
        start = time.perf_counter()
        engine = sa.create_engine(s.broker.database_url)
        wait_until(lambda: _succeeded(engine) >= n, 3600, "the queue to drain")
        drain_s = time.perf_counter() - start
        engine.dispose()
    return [
        Row("queue", f"{n} tasks: submit rate", "tasks/s", n / submit_s),
        Row("queue", f"{n} tasks: broker memory per queued task", "bytes", per_task, None, False),
        Row("queue", f"{n} tasks: dispatch + run rate", "tasks/s", n / drain_s),
    ]


def _succeeded(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(tasks).where(tasks.c.state == "succeeded")
        return int(conn.execute(query).scalar_one())


async def _submit_many(address: str, n: int, concurrency: int) -> None:
    payload = torch.arange(4, dtype=torch.float32)
    next_index = iter(range(n))
    async with AsyncClient(address, "key-a") as client:

        async def worker() -> None:
            for _ in next_index:
                await client.submit("echo", [payload])

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def billing_overhead(root: Path, per_client: int, clients: int, reps: int) -> list[Row]:
    """(d) what the usage ledger costs: tiny-task throughput (``map``, where per-task costs show
    most) and CPU per task with the ledger on and off, two brokers up side by side, runs paired
    (on/off, off/on, ...) and compared pair by pair; and the ledger's own CPU per task in the
    store, measured in-process (``bench.ledger``), as a share of a ``map`` task's CPU."""
    payload = torch.arange(4, dtype=torch.float32)
    pairs: list[dict[str, tuple[float, float]]] = []
    with (
        stack(root / "billing-on", env={"GPUBROKER_BILLING": "on"}, direct=False) as on,
        stack(root / "billing-off", env={"GPUBROKER_BILLING": "off"}, direct=False) as off,
    ):
        stacks = {"on": on, "off": off}
        for i in range(reps):
            pair = {}
            for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                pair[mode] = _map_throughput(stacks[mode], "broker", payload, clients, per_client)
            pairs.append(pair)
    rate = {m: median([p[m][0] for p in pairs]) for m in ("on", "off")}
    cpu = {m: median([p[m][1] for p in pairs]) for m in ("on", "off")}
    # Each pair ran back to back, so machine drift cancels within it: the median of the
    # pairs' differences is the steadier figure.
    rate_cost = median([(p["off"][0] - p["on"][0]) / p["off"][0] * 100 for p in pairs])
    cpu_cost = median([(p["on"][1] - p["off"][1]) / p["off"][1] * 100 for p in pairs])
    with_ledger, without, inside = ledger_cost_us(root / "ledger")
    return [
        Row("billing", f"{clients} clients, map: billing on vs off", "tasks/s", rate["on"],
            rate["off"]),
        Row("billing", "CPU per task, billing on vs off", "CPU ms/task", cpu["on"], cpu["off"],
            False),
        Row("billing", f"billing cost (throughput, median of {reps} pairs)", "%", rate_cost,
            None, False),
        Row("billing", f"billing cost (CPU per task, median of {reps} pairs)", "%", cpu_cost,
            None, False),
        Row("billing", "store CPU per task (in-process), ledger on vs off", "us/task",
            with_ledger, without, False),
        Row("billing", "CPU inside the ledger's calls per task (in-process)", "us/task",
            inside, None, False),
        Row("billing", "ledger's own CPU per task / a map task's CPU", "%",
            inside / (cpu["on"] * 1e3) * 100, None, False),
    ]  # fmt: skip

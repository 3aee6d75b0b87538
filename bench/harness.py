"""Processes under test and how their cost is measured: wall time, CPU seconds, RSS."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.paths import REPO_ROOT as ROOT
from tests.support.waiting import wait_until

__all__ = [
    "BENCH_BROKER_ENV",
    "Measurement",
    "Stack",
    "broker_env",
    "cpu_seconds",
    "median",
    "percentile",
    "rss_bytes",
    "stack",
]

_TICKS = os.sysconf("SC_CLK_TCK")

BENCH_BROKER_ENV: dict[str, str] = {
    "GPUBROKER_SUBMIT_RATE": "1e9",
    "GPUBROKER_SUBMIT_BURST": "1000000000",
    "GPUBROKER_MAX_QUEUED_PER_TENANT": "100000000",
}
"""Limits of every broker the bench starts: the per-tenant submit rate and queue cap lifted out
of the way. The bench measures the broker, not its rate limiter: the defaults (2,000 tasks/s,
a burst of 4,000; 100,000 queued) trip on a machine that submits faster than 2,000 tasks/s,
and ``--queue-tasks 100000`` would reach the queue cap. A variable set in the environment
wins, so a run can measure the broker with its limits on."""


def broker_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a bench broker: ``BENCH_BROKER_ENV`` (less what the environment
    already sets), then ``env``."""
    lifted = {k: v for k, v in BENCH_BROKER_ENV.items() if k not in os.environ}
    return {**lifted, **(env or {})}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def median(values: Sequence[float]) -> float:
    """The median."""
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


@dataclass
class Measurement:
    """Wall and CPU time of one timed block, CPU summed over the bench process and servers."""

    wall_s: float = 0.0
    cpu_s: float = 0.0


@dataclass
class Stack:
    """A broker with an agent, and a direct server, all on loopback."""

    root: Path
    broker: BrokerProcess
    agent: AgentProcess
    direct: subprocess.Popen[bytes]
    direct_address: str
    extra: list[AgentProcess] = field(default_factory=list)

    def pids(self, target: str) -> list[int]:
        """The server processes whose CPU counts for ``target`` ("broker" or "direct")."""
        if target == "direct":
            return [self.direct.pid]
        procs = [self.broker.proc, self.agent.proc, *(a.proc for a in self.extra)]
        return [p.pid for p in procs if p is not None]

    def address(self, target: str) -> str:
        """Where a client of ``target`` connects."""
        return self.direct_address if target == "direct" else self.broker.address

    @contextmanager
    def measure(self, target: str) -> Iterator[Measurement]:
        """Times the block: wall clock, and CPU of this process plus ``target``'s servers."""
        pids = self.pids(target)
        result = Measurement()
        cpu0 = time.process_time() + sum(cpu_seconds(p) for p in pids)
        wall0 = time.perf_counter()
        yield result
        result.wall_s = time.perf_counter() - wall0
        result.cpu_s = time.process_time() + sum(cpu_seconds(p) for p in pids) - cpu0


def _start_direct(root: Path, slots: int) -> tuple[subprocess.Popen[bytes], str]:
    port_file = root / "direct.port"
    with open(root / "direct.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.direct",
                "--port-file",
                str(port_file),
                "--slots",
                str(slots),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 60, "direct server")
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


@contextmanager
def stack(
    root: Path, *, slots: int = 4, env: dict[str, str] | None = None, direct: bool = True
) -> Iterator[Stack]:
    """Starts a broker (with ``broker_env(env)``), one agent and the direct server; stops them
    after."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    broker = BrokerProcess(root, heartbeat_s=5.0, lease_timeout_s=15.0, env=broker_env(env))
    broker.start()
    agent = AgentProcess(root, broker.address, "bench-agent", slots=slots).start()
    proc, address = _start_direct(root, slots) if direct else (None, "")
    running = Stack(root, broker, agent, proc, address)  # type: ignore[arg-type]
    try:
        yield running
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        for extra in running.extra:  # agents a scenario added (they would outlive the bench)
            extra.stop()
        agent.stop()
        broker.stop()


def warm_up(address: str, run: Callable[[str], object], times: int = 3) -> None:
    """Runs a call a few times so connections, caches and the agent are hot."""
    for _ in range(times):
        run(address)

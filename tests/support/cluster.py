"""Real processes for end-to-end tests: a broker (``python -m gpubroker.broker``) and agents.

Each runs as its own OS process on loopback, the way users run them, so tests can SIGKILL
either one. Files (SQLite database, payload spool, logs) live in the test's tmp directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.config import Settings
from gpubroker.broker.server import BrokerServer, create_server
from tests.support.paths import REPO_ROOT as ROOT
from tests.support.waiting import wait_until

AGENT_DEVICE_ENV = "GPUBROKER_AGENT_DEVICE"
"""Which ``--device`` agent processes get: ``cpu`` unless set (``cuda`` runs the end-to-end
tests and the bench on a GPU)."""


def agent_gpu_type() -> str:
    """The GPU type agent processes report: ``cpu``, or their CUDA device's (a GPU run)."""
    if os.environ.get(AGENT_DEVICE_ENV, "cpu") == "cpu":
        return "cpu"
    import torch  # only for a GPU run

    from gpubroker.gpu_agent.runner import gpu_slug

    return gpu_slug(torch.cuda.get_device_name())


API_KEYS = {"key-a": "tenant-a", "key-b": "tenant-b", "key-c": "tenant-c", "key-d": "tenant-d"}
"""API key -> tenant of the test broker."""


def broker_settings(root: Path, **overrides: Any) -> Settings:
    """Settings of an in-process test broker: a free loopback port, its SQLite database and
    spool under ``root``, schema migrated, and agents that tests start themselves (provider
    ``none``: the default ``local`` provider would start agent processes of its own)."""
    base = Settings(
        listen_address="127.0.0.1:0",
        database_url=f"sqlite:///{root / 'broker.db'}",
        spool_dir=root / "spool",
        migrate=True,
        provider="none",
    )
    return dataclasses.replace(base, **overrides)


class _Process:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], env: Mapping[str, str] | None = None) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        log.close()

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, as in a crash."""
        if self.proc is not None and self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        """Everything the process printed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class BrokerProcess(_Process):
    """``python -m gpubroker.broker`` on a loopback port, its database and spool under ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        api_keys: Mapping[str, str] = API_KEYS,
        heartbeat_s: float = 0.3,
        lease_timeout_s: float = 1.5,
        env: Mapping[str, str] | None = None,
        provider: str = "none",
    ) -> None:
        super().__init__(root / "broker.log")
        self._provider = provider
        self.root = root
        self.database_url = f"sqlite:///{root / 'broker.db'}"
        self._api_keys = api_keys
        self._heartbeat_s = heartbeat_s
        self._lease_timeout_s = lease_timeout_s
        self._env = env or {}
        self.port = 0

    @property
    def address(self) -> str:
        """host:port of the running broker."""
        return f"127.0.0.1:{self.port}"

    def start(
        self,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        *,
        same_port: bool = False,
    ) -> BrokerProcess:
        """Starts the broker and waits until its health check says SERVING.

        ``env`` replaces the environment given at construction for this start (and later ones).
        ``same_port`` restarts it on the port it had (a restart its clients ride through);
        otherwise it takes a free one.
        """
        if env is not None:
            self._env = env
        port_file = self.root / "broker.port"
        port_file.unlink(missing_ok=True)
        keys = ",".join(f"{k}={t}" for k, t in self._api_keys.items())
        listen = f"127.0.0.1:{self.port if same_port else 0}"
        args = ["-m", "gpubroker.broker", "--listen", listen, "--port-file", str(port_file)]
        args += ["--database-url", self.database_url, "--spool-dir", str(self.root / "spool")]
        args += ["--migrate", "--provider", self._provider]
        args += [
            "--heartbeat",
            str(self._heartbeat_s),
            "--lease-timeout",
            str(self._lease_timeout_s),
        ]
        if keys:
            args += ["--api-keys", keys]
        self._spawn(args, self._env)
        wait_until(
            lambda: (port_file.exists() and port_file.read_text().strip()) or not self.alive,
            timeout,
            "the broker's port file",
        )
        assert self.alive, f"broker exited:\n{self.log()}"
        self.port = int(port_file.read_text())
        wait_until(self.is_serving, timeout, "the broker's health check")
        return self

    def is_serving(self) -> bool:
        """Asks grpc.health.v1 whether the broker serves."""
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class AgentProcess(_Process):
    """``python -m gpubroker.gpu_agent`` dialling out to a broker."""

    def __init__(
        self,
        root: Path,
        broker_address: str,
        agent_id: str,
        slots: int = 2,
        metadata_url: str = "off",
        *,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(root / f"agent-{agent_id}.log")
        self.model_dir = root / f"models-{agent_id}"
        """The agent's model cache: its own, so no test sees another's (or the user's) models."""
        self.extra_args = tuple(extra_args)
        self.broker_address = broker_address
        self.agent_id = agent_id
        self.slots = slots
        self.device = os.environ.get(AGENT_DEVICE_ENV, "cpu")
        self.metadata_url = metadata_url
        # TLS when ca_file is given; mutual TLS with cert_file and key_file as well.
        self.tls_args: list[str] = []
        if ca_file is not None:
            self.tls_args = ["--tls", "--ca-file", str(ca_file)]
        if cert_file is not None and key_file is not None:
            self.tls_args += ["--cert-file", str(cert_file), "--key-file", str(key_file)]

    def start(self) -> AgentProcess:
        """Starts the agent (it connects on its own, retrying until the broker answers)."""
        self._spawn(
            [
                "-m",
                "gpubroker.gpu_agent",
                "--broker",
                self.broker_address,
                "--agent-id",
                self.agent_id,
                "--slots",
                str(self.slots),
                "--device",
                self.device,
                "--metadata-url",
                self.metadata_url,
                "--model-dir",
                str(self.model_dir),
                *self.tls_args,
                *self.extra_args,
            ]
        )
        return self


@contextlib.contextmanager
def broker_with_agent(
    root: Path, agent_id: str, slots: int = 2, env: Mapping[str, str] | None = None
) -> Iterator[BrokerProcess]:
    """A broker process with one agent process; both stopped on exit (module fixtures)."""
    broker = BrokerProcess(root, env=env).start()
    agent = AgentProcess(root, broker.address, agent_id, slots=slots).start()
    try:
        yield broker
    finally:
        agent.stop()
        broker.stop()


@contextlib.asynccontextmanager
async def running_broker(settings: Settings) -> AsyncIterator[BrokerServer]:
    """A broker in this process, stopped on exit (fixtures of in-process tests)."""
    server = await create_server(settings, PriceCatalog.load())
    try:
        yield server
    finally:
        await server.stop(grace=None)

"""The ``local`` provider: every instance is an agent process (``python -m gpubroker.gpu_agent``).

Each agent runs in its own session (so its own process group), with ``--agent-id`` set to the
instance name and its output in ``<state_dir>/<name>.log``. The process table lives in memory;
child processes cannot be adopted by another broker, so their pids are also written to
``<state_dir>/instances.json``. A provider opened later on the same directory (after a broker
restart) lists and stops those orphans, after checking that ``/proc/<pid>/cmdline`` still names
the agent, so a recycled pid is never signalled. One provider per directory at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gpubroker.broker.scaling.providers.base import (
    Instance,
    InstanceStatus,
    LaunchRequest,
    ProviderError,
)

__all__ = ["LocalProvider", "LocalSettings"]

logger = logging.getLogger(__name__)

_STATE_FILE = "instances.json"
_POLL_S = 0.05
_SOURCE_ROOT = Path(__file__).resolve().parents[2]
"""The tree ``broker`` was imported from; ``gpu_agent`` ships next to it."""


@dataclass(frozen=True, slots=True)
class LocalSettings:
    """How the local provider starts agents."""

    broker_address: str
    """host:port the agents dial."""
    state_dir: Path
    """Where agent logs and the pid file go; created when missing."""
    slots: int = 2
    """The agents' ``--slots``."""
    device: str = "cpu"
    """The agents' ``--device``."""
    gpu_type: str = "cpu"
    """GPU type reported for the instances (a price catalog name)."""
    join_token: str | None = None
    """The broker's agent join token, passed in the environment (not on the command line)."""
    stop_grace_s: float = 30.0
    """How long ``terminate`` waits for a drained exit after SIGTERM before SIGKILL."""
    python: str = field(default_factory=lambda: sys.executable)
    """The interpreter that runs the agents."""
    log_level: str = "INFO"
    """The agents' ``--log-level``."""
    tls: bool = False
    """The agents dial over TLS (``--tls``); the broker sets it when it serves TLS."""
    ca_file: str | None = None
    """The agents' ``--ca-file``: the CA that signed the broker's certificate. When None they
    take ``GPUBROKER_AGENT_CA_FILE`` from the broker's environment, else the public CAs."""
    cert_file: str | None = None
    """The agents' ``--cert-file``, for a broker that requires client certificates."""
    key_file: str | None = None
    """The agents' ``--key-file``: the key of ``cert_file``."""


@dataclass(eq=False)
class _Agent:
    instance: Instance
    pid: int
    process: subprocess.Popen[bytes] | None
    """None for an orphan adopted from the pid file."""
    stopping: bool = False

    @property
    def name(self) -> str:
        return self.instance.name

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _runs_agent(self.pid, self.name)


class LocalProvider:
    """Starts agents as child processes; see the module docstring."""

    name = "local"

    def __init__(self, settings: LocalSettings) -> None:
        self.settings = settings
        self._agents: dict[str, _Agent] = {}
        self._lock = threading.Lock()
        self._loaded = False

    def launch(self, request: LaunchRequest) -> Instance:
        """Starts one agent process; ``request``'s GPU types and Spot flag are ignored.

        Raises:
            ProviderError: the process could not be started.
        """
        name = f"local-{secrets.token_hex(4)}"
        with self._lock:
            self._load()
            process = self._spawn(name)
            instance = self._instance(name, process.pid, datetime.now(UTC))
            self._agents[name] = _Agent(instance, process.pid, process)
            self._save()
        logger.info("started agent %s (pid %d)", name, process.pid)
        return instance

    def list(self) -> list[Instance]:
        """Live agents, orphans included; one that died is listed once as TERMINATED."""
        with self._lock:
            self._load()
            found = [self._listed(a) for a in list(self._agents.values())]
            self._save()
        return found

    def terminate(self, name: str) -> None:
        """SIGTERM (the agent drains), then SIGKILL after ``stop_grace_s``; unknown is fine."""
        agent = self._begin_stop(name)
        if agent is not None:
            self._finish_stop(agent, time.monotonic() + self.settings.stop_grace_s)

    def close(self) -> None:
        """Stops every agent, all draining at once."""
        with self._lock:
            self._load()
            names = list(self._agents)
        agents = [a for n in names if (a := self._begin_stop(n)) is not None]
        deadline = time.monotonic() + self.settings.stop_grace_s
        for agent in agents:
            self._finish_stop(agent, deadline)

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        settings = self.settings
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        args = [settings.python, "-m", "gpubroker.gpu_agent", "--broker", settings.broker_address]
        args += ["--agent-id", name, "--slots", str(settings.slots), "--device", settings.device]
        args += ["--log-level", settings.log_level, "--metadata-url", "off"]  # not on GCE
        args += _tls_args(settings)
        try:
            with open(settings.state_dir / f"{name}.log", "ab") as log:
                return subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment(),
                    start_new_session=True,
                )
        except OSError as exc:
            raise ProviderError(f"could not start agent {name}: {exc}") from exc

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(_SOURCE_ROOT) + (os.pathsep + path if path else "")
        if self.settings.join_token is not None:
            env["GPUBROKER_AGENT_JOIN_TOKEN"] = self.settings.join_token
        return env

    def _instance(self, name: str, pid: int, created_at: datetime) -> Instance:
        return Instance(
            name=name,
            zone="local",
            gpu_type=self.settings.gpu_type,
            machine_type="local",
            spot=False,
            status=InstanceStatus.RUNNING,
            created_at=created_at,
            labels={"pid": str(pid)},
        )

    def _listed(self, agent: _Agent) -> Instance:
        if agent.is_alive():
            status = InstanceStatus.STOPPING if agent.stopping else InstanceStatus.RUNNING
            return _with_status(agent.instance, status)
        if not agent.stopping:
            del self._agents[agent.name]
            logger.warning(
                "agent %s (pid %d) exited on its own with %s; see %s",
                agent.name,
                agent.pid,
                "?" if agent.process is None else agent.process.returncode,
                self.settings.state_dir / f"{agent.name}.log",
            )
        return _with_status(agent.instance, InstanceStatus.TERMINATED)

    def _begin_stop(self, name: str) -> _Agent | None:
        with self._lock:
            self._load()
            agent = self._agents.get(name)
            if agent is None or agent.stopping:
                return None
            agent.stopping = True
        logger.info("stopping agent %s (pid %d)", name, agent.pid)
        _signal(agent, signal.SIGTERM)
        return agent

    def _finish_stop(self, agent: _Agent, deadline: float) -> None:
        if not _wait(agent, deadline):
            logger.warning("agent %s did not drain in time: SIGKILL", agent.name)
            _signal(agent, signal.SIGKILL)
            _wait(agent, time.monotonic() + 10.0)
        with self._lock:
            self._agents.pop(agent.name, None)
            self._save()

    def _load(self) -> None:
        """Adopts the live agents a previous provider on this directory left behind."""
        if self._loaded:
            return
        self._loaded = True
        for name, pid, created_at in _read_state(self.settings.state_dir / _STATE_FILE):
            if name in self._agents or not _runs_agent(pid, name):
                continue
            self._agents[name] = _Agent(self._instance(name, pid, created_at), pid, None)
            logger.info("found agent %s (pid %d) left by an earlier broker", name, pid)

    def _save(self) -> None:
        entries = [
            {"name": a.name, "pid": a.pid, "created_at": a.instance.created_at.isoformat()}
            for a in self._agents.values()
        ]
        path = self.settings.state_dir / _STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps({"instances": entries}, indent=1))
        os.replace(scratch, path)


def _tls_args(settings: LocalSettings) -> list[str]:
    """The agents' TLS flags; none for a plaintext broker."""
    if not settings.tls:
        return []
    args = ["--tls"]
    for flag, path in (
        ("--ca-file", settings.ca_file),
        ("--cert-file", settings.cert_file),
        ("--key-file", settings.key_file),
    ):
        if path is not None:
            args += [flag, str(Path(path).resolve())]
    return args


def _with_status(instance: Instance, status: InstanceStatus) -> Instance:
    return dataclasses.replace(instance, status=status)


def _read_state(path: Path) -> list[tuple[str, int, datetime]]:
    """(name, pid, created_at) of every agent in the pid file; a damaged file reads as empty."""
    try:
        entries = json.loads(path.read_text())["instances"]
        return [
            (str(e["name"]), int(e["pid"]), datetime.fromisoformat(e["created_at"]))
            for e in entries
        ]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return []


def _runs_agent(pid: int, name: str) -> bool:
    """True while ``pid`` is a live process whose command line is agent ``name``'s."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False  # gone, or no /proc: never signal a process we cannot identify
    # A zombie's cmdline is empty, so an exited agent no longer matches.
    return b"gpubroker.gpu_agent" in args and b"--agent-id" in args and name.encode() in args


def _signal(agent: _Agent, signum: signal.Signals) -> None:
    # Checked first: an exited orphan's pid may belong to someone else by now.
    if not agent.is_alive():
        return
    # Agents lead their own process group: signal the group so helpers they started go too.
    try:
        os.killpg(agent.pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise ProviderError(f"cannot signal agent process {agent.pid}: {exc}") from exc


def _wait(agent: _Agent, deadline: float) -> bool:
    """Waits until ``agent`` exits or ``deadline``; True when it exited."""
    if agent.process is not None:
        try:
            agent.process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            return False
        return True
    while _runs_agent(agent.pid, agent.name):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True

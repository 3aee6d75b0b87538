"""The GPU agent: dials out to a broker, runs named torch workloads and times them.

Run it with ``python -m gpubroker.gpu_agent --broker HOST:PORT`` (or ``gpubroker-agent``). Operators
add workloads through the ``gpubroker.workloads`` entry-point group (see
``gpubroker.gpu_agent.workloads``).
"""

from __future__ import annotations

from gpubroker.gpu_agent.agent import Agent
from gpubroker.gpu_agent.config import Backoff, Settings
from gpubroker.gpu_agent.errors import (
    AgentError,
    TaskCancelledError,
    UnknownWorkloadError,
    WorkloadArgumentError,
)
from gpubroker.gpu_agent.runner import DeviceInfo, Runner, RunOutcome, detect_device
from gpubroker.gpu_agent.workloads import Workload, WorkloadContext, register, registry

__all__ = [
    "Agent",
    "AgentError",
    "Backoff",
    "DeviceInfo",
    "RunOutcome",
    "Runner",
    "Settings",
    "TaskCancelledError",
    "UnknownWorkloadError",
    "Workload",
    "WorkloadArgumentError",
    "WorkloadContext",
    "detect_device",
    "register",
    "registry",
]

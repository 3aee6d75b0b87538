"""The GPU agent: dials out to a broker, runs named torch workloads and times them.

Run it with ``python -m gpu_agent --broker HOST:PORT`` (or ``gpubroker-agent``). Operators add
workloads through the ``gpubroker.workloads`` entry-point group (see ``gpu_agent.workloads``).
"""

from __future__ import annotations

from gpu_agent.agent import Agent
from gpu_agent.config import Backoff, Settings
from gpu_agent.errors import (
    AgentError,
    TaskCancelledError,
    UnknownWorkloadError,
    WorkloadArgumentError,
)
from gpu_agent.runner import DeviceInfo, Runner, RunOutcome, detect_device
from gpu_agent.workloads import Workload, WorkloadContext, register, registry

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

"""The GPU agent: dials out to a broker, runs named torch workloads and times them."""

from __future__ import annotations

from gpu_agent.agent import Agent
from gpu_agent.config import Settings
from gpu_agent.runner import DeviceInfo, Runner, RunOutcome, detect_device

__all__ = ["Agent", "DeviceInfo", "RunOutcome", "Runner", "Settings", "detect_device"]

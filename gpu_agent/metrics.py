"""The agent's own Prometheus metrics, served on ``/metrics`` with ``--metrics HOST:PORT``.

Everything is read at scrape time from the objects that keep it: the runner's ``DeviceMeter``
(slot and device busy time, billed time), the agent (attempts held, connection), its
``ModelCache`` (sizes, hits and misses) and, on a CUDA device with ``nvidia-ml-py`` installed,
NVML (GPU utilization and memory). The broker's ``/metrics`` has the fleet's view; this is one
machine's, for finding a GPU that idles while its slots look busy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpubroker.gpu_agent.nvml import GpuProbe

if TYPE_CHECKING:
    from gpubroker.gpu_agent.agent import Agent

__all__ = ["AgentMetrics"]


class AgentMetrics(Collector):
    """The agent's metrics, in a registry of their own (``registry``)."""

    def __init__(self, agent: Agent, version: str, probe: GpuProbe | None = None) -> None:
        self._agent = agent
        self._version = version
        self._probe = probe
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The metrics' values now."""
        yield from self._work()
        yield from self._models()
        yield from self._gpu()

    def describe(self) -> Iterator[Metric]:
        """Nothing: the registry then calls ``collect`` only at scrapes."""
        return iter(())

    def _work(self) -> Iterator[Metric]:
        agent, runner = self._agent, self._agent.runner
        info = GaugeMetricFamily(
            "gpubroker_agent_info",
            "Always 1; the labels say which agent this is.",
            labels=["agent_id", "gpu_type", "version"],
        )
        info.add_metric([agent.agent_id, runner.device.gpu_type, self._version], 1)
        yield info
        yield _gauge("gpubroker_agent_connected", "1 while a control stream to the broker is open.",
                     int(agent.connected))  # fmt: skip
        yield _gauge("gpubroker_agent_slots", "Tasks the agent runs at once.", runner.slots)
        meter = runner.meter
        yield _gauge(
            "gpubroker_agent_slots_busy", "Slots running a task's compute now.", meter.open_windows
        )
        yield _gauge(
            "gpubroker_agent_attempts_held",
            "Attempts assigned to the agent and not yet finished: running, waiting for a slot "
            "(prefetch), or uploading.",
            agent.attempts_held,
        )
        yield _counter(
            "gpubroker_agent_slot_busy_seconds",
            "Seconds of task compute summed over slots; its rate over gpubroker_agent_slots is "
            "the slots' utilization.",
            meter.slot_seconds,
        )
        yield _counter(
            "gpubroker_agent_device_busy_seconds",
            "Seconds in which at least one task computed on the device.",
            meter.busy_seconds,
        )
        yield _counter(
            "gpubroker_agent_billed_seconds",
            "Compute seconds the agent reported for tasks (overlapping tasks share the device).",
            meter.billed_seconds,
        )

    def _models(self) -> Iterator[Metric]:
        cache = self._agent.models
        yield _counter(
            "gpubroker_agent_model_cache_hits",
            "Model tasks whose model was loaded on the device already.",
            cache.hits,
        )
        yield _counter(
            "gpubroker_agent_model_cache_misses",
            "Model tasks that waited for their model to load.",
            cache.misses,
        )
        yield _counter(
            "gpubroker_agent_model_fetches", "Model files fetched from the broker.", cache.fetches
        )
        yield _counter("gpubroker_agent_model_loads", "Models loaded onto the device.", cache.loads)
        models = GaugeMetricFamily(
            "gpubroker_agent_models", "Models held, on disk and loaded on the device.",
            labels=["where"],
        )  # fmt: skip
        models.add_metric(["disk"], len(cache.on_disk()))
        models.add_metric(["device"], len(cache.resident()))
        yield models
        used = GaugeMetricFamily(
            "gpubroker_agent_model_bytes",
            "Bytes of models held (on the device: their files' sizes).",
            labels=["where"],
        )
        used.add_metric(["disk"], cache.disk_used_bytes)
        used.add_metric(["device"], cache.device_used_bytes)
        yield used
        limit = GaugeMetricFamily(
            "gpubroker_agent_model_limit_bytes", "The model cache's byte limits.", labels=["where"]
        )
        limit.add_metric(["disk"], cache.disk_bytes)
        limit.add_metric(["device"], cache.device_bytes)
        yield limit

    def _gpu(self) -> Iterator[Metric]:
        sample = None if self._probe is None else self._probe.sample()
        if sample is None:
            return
        yield _gauge(
            "gpubroker_agent_gpu_utilization_ratio",
            "Fraction of NVML's last sample period in which a kernel ran on the GPU (0 to 1).",
            sample.utilization,
        )
        yield _gauge(
            "gpubroker_agent_gpu_memory_used_bytes",
            "GPU memory in use (NVML: every process).",
            sample.memory_used_bytes,
        )
        yield _gauge(
            "gpubroker_agent_gpu_memory_total_bytes", "GPU memory.", sample.memory_total_bytes
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)

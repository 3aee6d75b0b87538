"""Bounded label values for the broker's metrics, and the gauges read from live state.

Every label value the broker exports comes from a set the operator bounds: tenants (see
``TenantLabels``), workloads (operator workloads keep their names; users' uploaded models,
``model:<id>``, are all ``model``), GPU types (the price catalog's), failure codes (an enum).
A Prometheus series per uploaded model or per tenant ever seen would grow without end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpubroker.broker.core.registry import AgentSession
from gpubroker.protos.modelfile import model_of

__all__ = [
    "AGENT_STATES",
    "OTHER",
    "LiveState",
    "TenantLabels",
    "workload_label",
]

OTHER = "other"
"""The label value of every tenant without one of its own."""

AGENT_STATES = ("idle", "busy", "draining")
"""Values of the ``state`` label of ``gpubroker_agents``."""

DEFAULT_TENANT_LIMIT = 20


def workload_label(workload: str) -> str:
    """An operator workload's name, or ``model`` for any uploaded model (``model:<id>``)."""
    return "model" if model_of(workload) is not None else workload


@dataclass(frozen=True, slots=True)
class _Choice:
    named: frozenset[str]
    limit: int


class TenantLabels:
    """Which tenants get a ``tenant`` label value of their own; the rest are ``other``.

    With ``named`` tenants (``GPUBROKER_METRICS_TENANTS``), exactly those. Without, the first
    ``limit`` distinct tenants seen since the broker started (``GPUBROKER_METRICS_TENANT_LIMIT``,
    20 by default; 0 labels none): a small deployment sees every tenant by name, and one with
    thousands of tenants cannot grow a series per tenant. Thread-safe.
    """

    def __init__(self, named: Iterable[str] = (), limit: int = DEFAULT_TENANT_LIMIT) -> None:
        if limit < 0:
            raise ValueError(f"the metrics tenant limit must be at least 0, got {limit}")
        self._choice = _Choice(frozenset(named), limit)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant: str) -> str:
        """The label value for ``tenant``."""
        if self._choice.named:
            return tenant if tenant in self._choice.named and tenant != OTHER else OTHER
        with self._lock:
            if tenant in self._seen:
                return tenant
            if len(self._seen) < self._choice.limit and tenant != OTHER:
                self._seen.add(tenant)
                return tenant
        return OTHER


class LiveState(Collector):
    """Gauges computed at each scrape from the queue, the agents' sessions and the spool."""

    def __init__(
        self,
        queued: Callable[[], int],
        sessions: Callable[[], Sequence[AgentSession]],
        held_bytes: Callable[[], int],
    ) -> None:
        self._queued = queued
        self._sessions = sessions
        self._held_bytes = held_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges' values now."""
        sessions = list(self._sessions())
        yield GaugeMetricFamily(
            "gpubroker_queue_depth", "Tasks waiting for an agent.", value=self._queued()
        )
        yield GaugeMetricFamily(
            "gpubroker_agents_connected", "Agents with a control stream.", value=len(sessions)
        )
        states = GaugeMetricFamily(
            "gpubroker_agents",
            "Connected agents by state: idle (no attempt), busy, draining (leaving).",
            labels=["state"],
        )
        for state in AGENT_STATES:
            states.add_metric([state], sum(_agent_state(s) == state for s in sessions))
        yield states
        yield GaugeMetricFamily(
            "gpubroker_free_slots",
            "Slots of connected agents with no attempt on them (prefetch not counted).",
            value=sum(s.free_slots for s in sessions if not s.draining),
        )
        yield GaugeMetricFamily(
            "gpubroker_busy_slots",
            "Slots of connected agents running an attempt.",
            value=sum(min(s.busy, s.info.slots) for s in sessions),
        )
        yield GaugeMetricFamily(
            "gpubroker_prefetched_tasks",
            "Attempts assigned to agents beyond their slots, queued there (prefetch).",
            value=sum(max(s.busy - s.info.slots, 0) for s in sessions),
        )
        yield GaugeMetricFamily(
            "gpubroker_payload_memory_bytes",
            "Run inputs held in memory (at most --spool-memory-mb).",
            value=self._held_bytes(),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """Nothing: the registry then calls ``collect`` only at scrapes."""
        return iter(())


def _agent_state(session: AgentSession) -> str:
    if session.draining:
        return "draining"
    return "busy" if session.busy else "idle"

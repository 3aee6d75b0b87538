"""Prometheus metrics of the broker, fed by task events and read from live state.

Served over HTTP (``/metrics``) when the broker is started with ``--metrics HOST:PORT``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from gpubroker.broker.core.reconcile import Drift
from gpubroker.broker.model import Task, TaskState
from gpubroker.broker.storage.retention import SweepReport

__all__ = ["Metrics"]

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600)
_BOOT_SECONDS = (1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
"""A local agent boots in a second or two, a GCE VM in one to several minutes."""
_ZONE_REFUSALS = frozenset({"stockout", "quota"})


class Metrics:
    """The broker's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter(
            "gpubroker_tasks_submitted", "Tasks accepted.", ["workload"], registry=r
        )
        self.finished = Counter(
            "gpubroker_tasks_finished",
            "Tasks that reached a final state.",
            ["workload", "state"],
            registry=r,
        )
        self.requeued = Counter(
            "gpubroker_tasks_requeued", "Attempts given back to the queue.", registry=r
        )
        self.reconciled = Counter(
            "gpubroker_reconciled_tasks",
            "Differences between the database and the queue or leases, repaired.",
            ["kind"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "gpubroker_queue_wait_seconds",
            "Submission to start of an attempt.",
            buckets=_SECONDS,
            registry=r,
        )
        self.compute = Histogram(
            "gpubroker_compute_seconds", "Measured compute time of succeeded tasks.", ["workload"],
            buckets=_SECONDS, registry=r,
        )  # fmt: skip
        self.bytes = Counter(
            "gpubroker_payload_bytes", "Tensor bytes of finished tasks.", ["direction"], registry=r
        )
        self.fallbacks = Counter(
            "gpubroker_provider_fallbacks",
            "Launches moved on to another zone (stockout, quota) or from Spot to on-demand.",
            ["reason", "zone", "gpu_type"],
            registry=r,
        )
        self.boot_phases = Histogram(
            "gpubroker_boot_phase_seconds",
            "Boot phases of launched machines: provision (created to RUNNING), install (to the "
            "agent's process start), connect (to its hello), total (created to hello).",
            ["phase", "gpu_type"],
            buckets=_BOOT_SECONDS,
            registry=r,
        )
        self.launch_failures = Counter(
            "gpubroker_launch_failures",
            "Failed launches: stuck (the agent never connected), stockout or quota (one zone "
            "refused), no_capacity (every zone refused; zone *).",
            ["kind", "gpu_type", "zone"],
            registry=r,
        )
        self.launch_backoff = Gauge(
            "gpubroker_launch_backoff_seconds",
            "Seconds until launches of a GPU type may go ahead again after failures (zone *: "
            "all zones; a zone: the provider tries it last until then).",
            ["gpu_type", "zone"],
            registry=r,
        )
        self._held: set[tuple[str, str]] = set()
        self.spool_bytes = Gauge(
            "gpubroker_spool_bytes", "Bytes of payload files in the spool, at the last sweep.",
            registry=r,
        )  # fmt: skip
        self.spool_files = Gauge(
            "gpubroker_spool_files", "Payload files in the spool, at the last sweep.", registry=r
        )
        self.spool_free_bytes = Gauge(
            "gpubroker_spool_free_bytes",
            "Free bytes on the spool's filesystem, at the last sweep.",
            registry=r,
        )
        self.results_expired = Counter(
            "gpubroker_results_expired", "Tasks whose outputs expired and were deleted.",
            registry=r,
        )  # fmt: skip
        self.orphans_removed = Counter(
            "gpubroker_spool_orphans_removed", "Orphaned spool files deleted.", registry=r
        )
        self.orphan_bytes_removed = Counter(
            "gpubroker_spool_orphan_bytes_removed", "Bytes of orphaned spool files deleted.",
            registry=r,
        )  # fmt: skip
        self._server: WSGIServer | None = None

    def watch_state(
        self,
        queued: Callable[[], int],
        agents: Callable[[], int],
        free_slots: Callable[[], int],
        held_bytes: Callable[[], int] = lambda: 0,
    ) -> None:
        """Reports live gauges by calling these when scraped."""
        r = self.registry
        Gauge("gpubroker_queue_depth", "Tasks waiting for an agent.", registry=r).set_function(
            queued
        )
        Gauge(
            "gpubroker_agents_connected", "Agents with a control stream.", registry=r
        ).set_function(agents)
        Gauge(
            "gpubroker_free_slots", "Slots agents have offered and not yet filled.", registry=r
        ).set_function(free_slots)
        Gauge(
            "gpubroker_payload_memory_bytes",
            "Run inputs held in memory (at most --spool-memory-mb).",
            registry=r,
        ).set_function(held_bytes)

    def record_sweep(self, report: SweepReport) -> None:
        """Takes one spool sweep's report (``SpoolKeeper``)."""
        self.spool_bytes.set(report.bytes)
        self.spool_files.set(report.files)
        self.spool_free_bytes.set(report.free_bytes)
        self.results_expired.inc(report.expired)
        self.orphans_removed.inc(report.orphans)
        self.orphan_bytes_removed.inc(report.orphan_bytes)

    def reconciled_task(self, drift: Drift) -> None:
        """Counts one repair reconciliation made."""
        self.reconciled.labels(drift.value).inc()

    def fallback(self, reason: str, zone: str, gpu_type: str) -> None:
        """Counts one provider fallback; a zone's stockout or quota refusal is a failed launch."""
        self.fallbacks.labels(reason, zone, gpu_type).inc()
        if reason in _ZONE_REFUSALS:
            self.launch_failures.labels(reason, gpu_type, zone).inc()

    def boot_phase(self, phase: str, gpu_type: str, seconds: float) -> None:
        """Observes one phase of one machine's boot (``ScalingEvents``)."""
        self.boot_phases.labels(phase, gpu_type).observe(seconds)

    def launch_failure(self, kind: str, gpu_type: str, zone: str) -> None:
        """Counts one failed launch (``ScalingEvents``)."""
        self.launch_failures.labels(kind, gpu_type, zone).inc()

    def launch_holds(self, holds: Sequence[tuple[str, str, float]]) -> None:
        """Sets the backoff gauges to ``holds``; keys no longer held go to 0 (``ScalingEvents``)."""
        now = {(gpu_type, zone) for gpu_type, zone, _ in holds}
        for gpu_type, zone in self._held - now:
            self.launch_backoff.labels(gpu_type, zone).set(0)
        for gpu_type, zone, seconds in holds:
            self.launch_backoff.labels(gpu_type, zone).set(seconds)
        self._held |= now

    def observe(self, task: Task) -> None:
        """Counts one published task snapshot (a state change)."""
        if task.state is TaskState.QUEUED and task.attempt:
            self.requeued.inc()
        elif task.state is TaskState.QUEUED:
            self.submitted.labels(task.workload).inc()
        elif task.state is TaskState.RUNNING and task.started_at is not None:
            self.queue_wait.observe((task.started_at - task.created_at).total_seconds())
        elif task.state.is_final:
            self.finished.labels(task.workload, task.state.value).inc()
            if task.state is TaskState.SUCCEEDED:
                self.compute.labels(task.workload).observe(task.compute_seconds or 0.0)
                self.bytes.labels("in").inc(task.input_bytes)
                self.bytes.labels("out").inc(task.output_bytes)

    def serve(self, address: str) -> int:
        """Serves ``/metrics`` at ``host:port`` (port 0 picks one); returns the port."""
        host, _, port = address.rpartition(":")
        self._server, _ = start_http_server(int(port), host or "0.0.0.0", self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stops the HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

"""Prometheus metrics of the broker, fed by task events and the autoscaler, and read from live
state at each scrape (``metrics_labels.LiveState``).

Served over HTTP (``/metrics``, by ``gpubroker.httpserver``) when the broker is started with
``--metrics HOST:PORT``. Label values are bounded (``metrics_labels``): tenants by
configuration, workloads with uploaded models folded into ``model``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from gpubroker.billing.errors import UnknownPriceError
from gpubroker.billing.prices import PriceCatalog, cost_nanousd
from gpubroker.broker.core.reconcile import Drift
from gpubroker.broker.core.registry import AgentSession
from gpubroker.broker.metrics_labels import LiveState, TenantLabels, workload_label
from gpubroker.broker.model import Task, TaskState
from gpubroker.broker.scaling.fleet import MACHINE_STATES, FleetTick
from gpubroker.broker.storage.retention import SweepReport

__all__ = ["Metrics"]

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600)
_BOOT_SECONDS = (1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
"""A local agent boots in a second or two, a GCE VM in one to several minutes."""
_ZONE_REFUSALS = frozenset({"stockout", "quota"})


class Metrics:
    """The broker's metrics, in a registry of their own.

    Args:
        tenants: which tenants get a label value of their own (default: the first 20 seen).
        catalog: prices succeeded tasks for ``gpubroker_billed_nanousd``; None counts none.
    """

    def __init__(
        self, tenants: TenantLabels | None = None, catalog: PriceCatalog | None = None
    ) -> None:
        # Every counter and histogram would export a "<name>_created" series too (one more
        # series per label set, for a start time no dashboard reads); the switch is global.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self.tenant = tenants or TenantLabels()
        self._catalog = catalog
        r = self.registry
        self.submitted = Counter(
            "gpubroker_tasks_submitted", "Tasks accepted.", ["tenant", "workload"], registry=r
        )
        self.finished = Counter(
            "gpubroker_tasks_finished",
            "Tasks that reached a final state.",
            ["tenant", "workload", "state"],
            registry=r,
        )
        self.failures = Counter(
            "gpubroker_task_failures",
            "Tasks that failed or were cancelled, by failure code (the client's gRPC status).",
            ["tenant", "state", "code"],
            registry=r,
        )
        self.billed_seconds = Counter(
            "gpubroker_billed_compute_seconds",
            "Compute seconds billed to tenants (succeeded attempts).",
            ["tenant", "gpu_type"],
            registry=r,
        )
        self.billed_nanousd = Counter(
            "gpubroker_billed_nanousd",
            "What tenants were billed for compute, in nano-USD (catalog prices).",
            ["tenant", "gpu_type"],
            registry=r,
        )
        self.machine_seconds = Counter(
            "gpubroker_machine_seconds",
            "Machine time the provider charges for (RUNNING to deleted, boot and idle included).",
            ["gpu_type"],
            registry=r,
        )
        self.machine_nanousd = Counter(
            "gpubroker_machine_cost_nanousd",
            "What that machine time cost at catalog prices, in nano-USD; less "
            "gpubroker_billed_nanousd, the idle overhead.",
            ["gpu_type"],
            registry=r,
        )
        self.machines = Gauge(
            "gpubroker_machines",
            "Autoscaled machines by state (booting, running, stopping) at the autoscaler's last "
            "tick.",
            ["state", "gpu_type"],
            registry=r,
        )
        self._machine_keys: set[tuple[str, str]] = set()
        self.decisions = Counter(
            "gpubroker_autoscaler_decisions",
            "Machines the autoscaler decided to launch (kind demand or min_instances) or stop "
            "(kind idle, stuck or terminated).",
            ["action", "kind", "gpu_type"],
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

    def watch_state(
        self,
        queued: Callable[[], int],
        sessions: Callable[[], Sequence[AgentSession]],
        held_bytes: Callable[[], int] = lambda: 0,
    ) -> None:
        """Reports live gauges (queue, agents by state, slots, memory) by calling these when
        scraped (``LiveState``)."""
        self.registry.register(LiveState(queued, sessions, held_bytes))

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

    def decision(self, action: str, kind: str, gpu_type: str, count: int) -> None:
        """Counts machines the autoscaler decided to launch or stop (``ScalingEvents``)."""
        self.decisions.labels(action, kind, gpu_type).inc(count)

    def fleet(self, tick: FleetTick) -> None:
        """Sets the machine gauges and adds machine time and cost (``ScalingEvents``)."""
        for state, gpu_type in self._machine_keys - set(tick.machines):
            self.machines.labels(state, gpu_type).set(0)
        for (state, gpu_type), count in tick.machines.items():
            self.machines.labels(state, gpu_type).set(count)
        self._machine_keys |= set(tick.machines)
        for gpu_type in {g for _, g in self._machine_keys}:  # every state shows, 0 or not
            for state in MACHINE_STATES:
                self.machines.labels(state, gpu_type)
        for gpu_type, seconds in tick.seconds.items():
            self.machine_seconds.labels(gpu_type).inc(seconds)
        for gpu_type, nanousd in tick.nanousd.items():
            self.machine_nanousd.labels(gpu_type).inc(nanousd)

    def observe(self, task: Task) -> None:
        """Counts one published task snapshot (a state change)."""
        tenant, workload = self.tenant(task.tenant), workload_label(task.workload)
        if task.state is TaskState.QUEUED and task.attempt:
            self.requeued.inc()
        elif task.state is TaskState.QUEUED:
            self.submitted.labels(tenant, workload).inc()
        elif task.state is TaskState.RUNNING and task.started_at is not None:
            self.queue_wait.observe((task.started_at - task.created_at).total_seconds())
        elif task.state.is_final:
            self.finished.labels(tenant, workload, task.state.value).inc()
            if task.state is TaskState.SUCCEEDED:
                self._succeeded(task, tenant, workload)
            else:
                code = "UNKNOWN" if task.error_code is None else task.error_code.value
                self.failures.labels(tenant, task.state.value, code).inc()

    def _succeeded(self, task: Task, tenant: str, workload: str) -> None:
        seconds = task.compute_seconds or 0.0
        gpu_type = task.gpu_type or "unknown"
        self.compute.labels(workload).observe(seconds)
        self.bytes.labels("in").inc(task.input_bytes)
        self.bytes.labels("out").inc(task.output_bytes)
        self.billed_seconds.labels(tenant, gpu_type).inc(seconds)
        if self._catalog is not None:
            try:
                price = self._catalog.price_for(gpu_type)
            except UnknownPriceError:
                return
            cost = cost_nanousd(seconds, price, self._catalog.policy)
            self.billed_nanousd.labels(tenant, gpu_type).inc(cost)

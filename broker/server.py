"""Builds the broker from ``Settings``: storage, dispatcher, servicers, health and reflection.

The only place that wires objects together: what several of them share (the store, the spool,
the queue, the agent registry, the known workloads, the task events) is built here once and
handed to each constructor.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.auth.exceptions import GoogleAuthError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import Engine

from gpubroker.billing.errors import BillingError
from gpubroker.billing.migrate import current_revision, head_revision, upgrade
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.access.auth import Authenticator, database_keys
from gpubroker.broker.access.tls import bind_port
from gpubroker.broker.api.gateway import AgentGatewayServicer
from gpubroker.broker.api.limits import CallLimits
from gpubroker.broker.api.registration import add_servicer
from gpubroker.broker.api.servicer import BrokerServicer
from gpubroker.broker.api.status_page import StatusPage
from gpubroker.broker.api.tenancy import TenantCalls
from gpubroker.broker.config import Settings, StreamLimits
from gpubroker.broker.core.capacity import Capacity
from gpubroker.broker.core.dispatcher import Dispatcher
from gpubroker.broker.core.events import TaskEvents
from gpubroker.broker.core.models import ModelService
from gpubroker.broker.core.reconcile import Reconciler
from gpubroker.broker.core.registry import AgentRegistry, Liveness
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.core.status_source import StatusSource
from gpubroker.broker.core.tasklog import log_outcome
from gpubroker.broker.core.tasks import TaskService
from gpubroker.broker.core.workloads import KnownWorkloads
from gpubroker.broker.errors import ConfigError, SchemaOutdatedError
from gpubroker.broker.metrics import Metrics
from gpubroker.broker.metrics_labels import TenantLabels
from gpubroker.broker.scaling.loop import (
    PROVIDERS,
    ScalingConfig,
    ScalingLoop,
    load_scaling_config,
)
from gpubroker.broker.scaling.providers.base import Provider
from gpubroker.broker.scaling.providers.local import LocalProvider, LocalSettings
from gpubroker.broker.storage.async_store import AsyncTaskStore
from gpubroker.broker.storage.engine import create_engine
from gpubroker.broker.storage.model_files import ModelFiles
from gpubroker.broker.storage.retention import SpoolKeeper
from gpubroker.broker.storage.spool import Spool
from gpubroker.broker.storage.store import TaskStore
from gpubroker.httpserver import HttpServer, metrics_handler
from gpubroker.protos import agent_pb2, broker_pb2
from gpubroker.protos.transport import server_options

__all__ = ["BrokerServer", "create_server"]

logger = logging.getLogger(__name__)

_BROKER_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["Broker"]
_AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentGateway"]
_SERVICE_NAMES = (_BROKER_SERVICE.full_name, _AGENT_SERVICE.full_name)


@dataclass
class BrokerServer:
    """A running broker: the gRPC server and the objects behind it."""

    server: grpc.aio.Server
    port: int
    dispatcher: Dispatcher
    tasks: TaskService
    """What the client-facing service calls: submit, watch, cancel, ..."""
    models: ModelService
    """Tenants' uploaded models."""
    store: AsyncTaskStore
    engine: Engine
    """The database the store, the API keys and the VM log are in."""
    spool: Spool
    queue: FairQueue
    """The queued tasks' ids, in dispatch order."""
    registry: AgentRegistry
    """The connected agents."""
    workloads: KnownWorkloads
    health: health.aio.HealthServicer
    metrics: Metrics
    metrics_port: int | None
    http: HttpServer | None = None
    """The HTTP server of ``/metrics`` (``--metrics``); other pages may add routes to it."""
    scaling: ScalingLoop | None = None
    auth: Authenticator | None = None
    keeper: SpoolKeeper | None = None
    """Expires results and sweeps orphaned payload files."""
    reconciler: Reconciler | None = None
    """Compares the database's live tasks with the queue and the leases, repairs differences."""
    status: StatusSource | None = None
    """What ``GetStatus`` and the status page show."""

    async def stop(self, grace: float | None = 1.0) -> None:
        """Reports NOT_SERVING, stops the server and the dispatcher, closes the store.

        Local agent processes are stopped with the broker; GCE VMs are left for the next
        broker to adopt (their max run duration bounds what a broker that never returns costs).
        """
        await self.health.enter_graceful_shutdown()
        if self.scaling is not None:
            await self.scaling.stop(release=self.scaling.provider.name == "local")
        if self.http is not None:
            self.http.close()
        if self.reconciler is not None:
            await self.reconciler.stop()
        await self.dispatcher.stop()
        await self.server.stop(grace)
        if self.auth is not None:
            await self.auth.stop()
        if self.keeper is not None:
            await self.keeper.stop()
        await self.store.close()


def _prepare_schema(engine: Engine, migrate: bool) -> None:
    if migrate:
        upgrade(engine)
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutdatedError(
            f"the database is at schema revision {current or 'none'} but this broker needs "
            f"{head}: run `python -m gpubroker.billing migrate` (make migrate) or start with "
            "--migrate"
        )


async def create_server(settings: Settings, catalog: PriceCatalog | None = None) -> BrokerServer:
    """Opens storage, recovers queued tasks, binds the port and starts serving."""
    engine = create_engine(settings.database_url)
    _prepare_schema(engine, settings.migrate)
    catalog = catalog or PriceCatalog.load()
    store = AsyncTaskStore(TaskStore(engine, catalog, billing=settings.billing))
    spool = Spool(settings.spool_dir, settings.spool_memory_bytes, settings.spool_floor)
    spool.open()
    queue, registry, workloads = FairQueue(), AgentRegistry(), KnownWorkloads()
    tenants = TenantLabels(settings.metrics_tenants, settings.metrics_tenant_limit)
    metrics = Metrics(tenants, catalog)
    events = TaskEvents(listeners=[metrics.observe, log_outcome])
    dispatcher = Dispatcher(
        store,
        spool,
        events,
        queue,
        registry,
        workloads,
        settings.limits,
        Liveness(settings.heartbeat_interval_s, settings.lease_timeout_s),
        capacity=(capacity := Capacity()),
        affinity_wait_s=settings.model_affinity_wait_s,
        failpoint=settings.failpoint,
    )
    metrics.watch_state(
        queued=lambda: len(queue),
        sessions=lambda: list(registry.sessions()),
        held_bytes=lambda: spool.held_bytes,
    )
    auth = Authenticator(settings.api_keys, settings.join_token, database_keys(engine))
    await auth.refresh()
    if auth.is_open:
        logger.warning("no API keys configured: every caller is tenant 'default'")
    models = ModelService(
        store, ModelFiles(settings.spool_dir / "models"), settings.models, spool.check_room
    )
    await models.start()
    keeper = SpoolKeeper(engine, spool, settings.retention, on_sweep=metrics.record_sweep)
    tasks = TaskService(
        store, spool, dispatcher, events, queue, workloads, settings.limits, models, keeper
    )
    gateway = AgentGatewayServicer(dispatcher, spool, auth, settings.heartbeat_interval_s, models)
    status = StatusSource(store, engine, queue, registry)
    server, health_servicer = _grpc_server(
        BrokerServicer(tasks, models, status), gateway, auth, settings.streams
    )
    port = bind_port(server, settings)
    scaling = None
    if (scaled := _scaling(settings, port, catalog, metrics)) is not None:
        provider, config = scaled
        scaling = ScalingLoop(
            provider, config, store, queue, registry, engine, catalog, capacity, events=metrics
        )
        events.add_listener(scaling.observe_task)
        status.stopping = scaling.stopping
    reconciler = Reconciler(
        store, queue, registry, dispatcher, settings.reconcile_interval_s, metrics.reconciled_task
    )
    await dispatcher.start()
    reconciler.start()
    await keeper.start()
    await server.start()
    auth.start()
    for name in ("", *_SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    http, metrics_port = _http_server(settings.metrics_address, metrics)
    if http is not None and settings.metrics_address:
        StatusPage(status, auth, settings.metrics_address).add_routes(http)
    if scaling is not None:
        scaling.start()
    logger.info(
        "broker listening on port %d (metrics: %s, agents: %s)",
        port,
        metrics_port or "off",
        settings.provider,
    )
    return BrokerServer(
        server=server,
        port=port,
        dispatcher=dispatcher,
        tasks=tasks,
        models=models,
        store=store,
        engine=engine,
        spool=spool,
        queue=queue,
        registry=registry,
        workloads=workloads,
        health=health_servicer,
        metrics=metrics,
        metrics_port=metrics_port,
        http=http,
        scaling=scaling,
        auth=auth,
        keeper=keeper,
        reconciler=reconciler,
        status=status,
    )


def _http_server(address: str | None, metrics: Metrics) -> tuple[HttpServer | None, int | None]:
    """The started HTTP server of ``/metrics`` at ``address``; (None, None) when off."""
    if not address:
        return None, None
    try:
        http = HttpServer(address, asyncio.get_running_loop())
        http.add_route("/metrics", metrics_handler(metrics.registry))
        return http, http.start()
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--metrics {address}: {exc}") from exc


def _grpc_server(
    broker: BrokerServicer,
    gateway: AgentGatewayServicer,
    auth: Authenticator,
    limits: StreamLimits,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The server with both services, health and reflection (these two need no key), and
    ``limits`` on what a connection, a tenant and an upload may hold."""
    server = grpc.aio.server(
        options=server_options(
            max_connection_idle_ms=round(limits.connection_idle_s * 1000),
            max_connection_age_ms=round(limits.connection_max_age_s * 1000),
            max_connection_age_grace_ms=(
                None
                if limits.connection_age_grace_s is None
                else round(limits.connection_age_grace_s * 1000)
            ),
            max_concurrent_streams=limits.max_streams_per_connection,
            max_metadata_bytes=limits.max_metadata_bytes,
        ),
        interceptors=(CallLimits(limits),),
    )
    calls = TenantCalls(auth.caller, limits.max_calls_per_tenant)
    add_servicer(server, _BROKER_SERVICE, broker, authenticate=calls)
    add_servicer(server, _AGENT_SERVICE, gateway)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *_SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server, health_servicer


def _scaling(
    settings: Settings, port: int, catalog: PriceCatalog, metrics: Metrics
) -> tuple[Provider, ScalingConfig] | None:
    """The configured provider and scaling configuration; None when agents join by hand."""
    if settings.provider == "none":
        return None
    try:
        config = load_scaling_config(settings.scaling_config, settings.provider, catalog)
        provider = _provider(settings, port, config, metrics)
    except (ValueError, TypeError, OSError, BillingError, GoogleAuthError) as exc:
        raise ConfigError(f"autoscaling configuration: {exc}") from exc
    return provider, config


def _provider(settings: Settings, port: int, config: ScalingConfig, metrics: Metrics) -> Provider:
    table = config.provider_table
    if settings.provider == "local":
        values: dict[str, Any] = {
            "broker_address": f"127.0.0.1:{port}",
            "join_token": settings.join_token,
            "tls": settings.tls_cert_file is not None,  # the port speaks TLS: so must they
        }
        values |= {"state_dir": settings.spool_dir.parent / "agents"} | dict(table)
        values["state_dir"] = Path(values["state_dir"])
        return LocalProvider(LocalSettings(**values))
    if settings.provider == "gce":
        # The GCE client takes a second to import: only when it is used.
        from gpubroker.broker.scaling.providers.gce import GceProvider, GceSettings, GpuOffering

        gce: dict[str, Any] = {"join_token": settings.join_token} | dict(table)
        gce["zones"] = tuple(gce.get("zones", ()))
        if "offerings" in gce:
            gce["offerings"] = {k: GpuOffering(**v) for k, v in gce["offerings"].items()}
        return GceProvider(GceSettings(**gce), on_fallback=metrics.fallback, backoff=config.backoff)
    raise ValueError(f"unknown provider {settings.provider!r}; choose one of {PROVIDERS}")

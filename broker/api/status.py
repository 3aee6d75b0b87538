"""``GetStatus`` of the ``Broker`` service: the caller's view of the broker (``core.status``).

A part of ``BrokerServicer`` (which inherits it), like ``ModelRpcs``. The caller's tenant and
role come from ``calling_caller()``: an operator key sees the whole broker, any other key its
tenant's share.
"""

from __future__ import annotations

from typing import Any

import grpc

from gpubroker.broker.api.convert import abort_on_broker_error, task_to_proto
from gpubroker.broker.api.tenancy import calling_caller
from gpubroker.broker.core.status import AgentLine, MachineLine, QueueLine, Spend, Status
from gpubroker.broker.core.status_source import StatusSource
from gpubroker.protos import broker_pb2
from gpubroker.protos.convert import time_to_proto

__all__ = ["StatusRpcs", "status_to_proto"]

Context = grpc.aio.ServicerContext[Any, Any]


class StatusRpcs:
    """``GetStatus``."""

    _status: StatusSource

    async def GetStatus(
        self, request: broker_pb2.GetStatusRequest, context: Context
    ) -> broker_pb2.GetStatusResponse:
        async with abort_on_broker_error(context):
            status = await self._status.status(calling_caller(), request.recent_tasks)
        return status_to_proto(status)


def status_to_proto(status: Status) -> broker_pb2.GetStatusResponse:
    """Converts a status."""
    counts = status.machine_counts
    return broker_pb2.GetStatusResponse(
        generated_at=time_to_proto(status.generated_at),
        tenant=status.tenant,
        operator_view=status.operator_view,
        queue=[_queue_line(line) for line in status.queue],
        queued_tasks=status.queued_tasks,
        running_tasks=status.running_tasks,
        agents=[_agent(agent) for agent in status.agents],
        agent_count=status.agent_count,
        free_slots=status.free_slots,
        machines=[_machine(machine) for machine in status.machines],
        machine_counts=broker_pb2.MachineCounts(
            booting=counts.booting, running=counts.running, stopping=counts.stopping
        ),
        spend=_spend(status.spend),
        recent_tasks=[
            task_to_proto(line.task, attempts=line.attempts) for line in status.recent_tasks
        ],
    )


def _queue_line(line: QueueLine) -> broker_pb2.QueueLine:
    return broker_pb2.QueueLine(
        tenant=line.tenant,
        workload=line.workload,
        gpu_type=line.gpu_type,
        depth=line.depth,
        oldest_wait_seconds=line.oldest_wait_s,
    )


def _agent(agent: AgentLine) -> broker_pb2.AgentStatus:
    return broker_pb2.AgentStatus(
        agent_id=agent.agent_id,
        gpu_type=agent.gpu_type,
        slots=agent.slots,
        busy_slots=agent.busy_slots,
        free_slots=agent.free_slots,
        prefetch_held=agent.prefetch_held,
        models=agent.models,
        connected_at=time_to_proto(agent.connected_at),
        task_ids=agent.task_ids,
        machine_name=agent.machine_name,
        draining=agent.draining,
        version=agent.version,
    )


def _machine(machine: MachineLine) -> broker_pb2.MachineStatus:
    return broker_pb2.MachineStatus(
        name=machine.name,
        state=machine.state,
        provider=machine.provider,
        gpu_type=machine.gpu_type,
        zone=machine.zone,
        spot=machine.spot,
        created_at=time_to_proto(machine.created_at),
        age_seconds=machine.age_s,
        cost_nanousd=machine.cost_nanousd,
        price_per_hour_nanousd=machine.price_per_hour_nanousd,
    )


def _spend(spend: Spend) -> broker_pb2.Spend:
    return broker_pb2.Spend(
        today_nanousd=spend.today_nanousd,
        month_nanousd=spend.month_nanousd,
        today_tasks=spend.today_tasks,
        month_tasks=spend.month_tasks,
        machines_today_nanousd=spend.machines_today_nanousd,
        machines_month_nanousd=spend.machines_month_nanousd,
        idle_today_nanousd=spend.idle_today_nanousd,
        idle_month_nanousd=spend.idle_month_nanousd,
    )

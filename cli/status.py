"""``gpubroker status``: the broker's queue, agents, machines, recent tasks and spend.

It calls the ``GetStatus`` RPC, which ``grpcurl`` can call too: an operator key sees the whole
broker, any other key its tenant's share.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import click
from google.protobuf.json_format import MessageToDict

from gpubroker.cli.connection import Connection, connection_options
from gpubroker.cli.exits import remote_errors
from gpubroker.cli.output import echo_json, json_option, print_pairs, print_table, when
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.convert import state_from_proto, time_from_proto

__all__ = ["status", "usd"]


def usd(nanousd: int) -> str:
    """Nano-dollars as dollars, to the cent (to a tenth of a cent below a dollar)."""
    dollars = nanousd / 1e9
    return f"${dollars:,.2f}" if abs(dollars) >= 1 else f"${dollars:.3f}"


def _age(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@click.command()
@click.option(
    "--recent",
    type=click.IntRange(0, 200),
    default=20,
    help="How many of the most recent tasks to show.",
)
@click.option(
    "--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, help="Seconds."
)
@json_option
@connection_options
def status(recent: int, timeout: float, as_json: bool, connection: Connection) -> None:
    """Shows the queue by tenant, workload and GPU type, the agents, the machines and what
    they cost, recent tasks, and spend today and this month.

    An operator key sees the whole broker; any other key sees its own tenant's queue, tasks
    and spend, and only the number of agents and machines.
    """
    request = broker_pb2.GetStatusRequest(recent_tasks=recent)
    with remote_errors(), connection.channel() as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        reply = stub.GetStatus(request, metadata=connection.metadata, timeout=timeout)
    if as_json:
        echo_json(MessageToDict(reply, preserving_proto_field_name=True))
        return
    _print(reply)


def _print(reply: broker_pb2.GetStatusResponse) -> None:
    view = "operator: the whole broker" if reply.operator_view else f"tenant {reply.tenant}"
    taken = time_from_proto(reply, "generated_at") or datetime.now(UTC)
    counts = reply.machine_counts
    spend = reply.spend
    print_pairs(
        [
            ("view", view),
            ("at (UTC)", when(taken)),
            ("queued", str(reply.queued_tasks)),
            ("running", str(reply.running_tasks)),
            ("agents", f"{reply.agent_count} ({reply.free_slots} free slots)"),
            (
                "machines",
                f"{counts.booting} booting, {counts.running} running, {counts.stopping} stopping",
            ),
            ("spend today", f"{usd(spend.today_nanousd)} ({spend.today_tasks} tasks)"),
            ("spend this month", f"{usd(spend.month_nanousd)} ({spend.month_tasks} tasks)"),
        ]
    )
    if reply.operator_view:
        print_pairs(
            [
                ("machines today", usd(spend.machines_today_nanousd)),
                ("machines this month", usd(spend.machines_month_nanousd)),
                ("idle overhead today", usd(spend.idle_today_nanousd)),
                ("idle overhead this month", usd(spend.idle_month_nanousd)),
            ]
        )
    _queue(reply.queue)
    _agents(reply.agents)
    _machines(reply.machines)
    _recent(reply.recent_tasks)


def _queue(lines: Iterable[broker_pb2.QueueLine]) -> None:
    rows = [
        (q.tenant, q.workload, q.gpu_type or "any", q.depth, _age(q.oldest_wait_seconds))
        for q in lines
    ]
    if rows:
        print_table(("TENANT", "WORKLOAD", "GPU", "QUEUED", "OLDEST WAIT"), rows, title="Queue")


def _agents(agents: Iterable[broker_pb2.AgentStatus]) -> None:
    rows = [
        (
            a.agent_id + (" (draining)" if a.draining else ""),
            a.gpu_type,
            f"{a.busy_slots}/{a.slots}",
            a.prefetch_held,
            len(a.models),
            when(time_from_proto(a, "connected_at")),
            ", ".join(a.task_ids),
        )
        for a in agents
    ]
    if rows:
        print_table(
            ("AGENT", "GPU", "BUSY", "PREFETCH", "MODELS", "CONNECTED (UTC)", "TASKS"),
            rows,
            title="Agents",
        )


def _machines(machines: Iterable[broker_pb2.MachineStatus]) -> None:
    rows = [
        (
            m.name,
            m.state,
            m.provider,
            m.gpu_type + (" spot" if m.spot else ""),
            m.zone,
            _age(m.age_seconds),
            usd(m.cost_nanousd),
        )
        for m in machines
    ]
    if rows:
        print_table(
            ("MACHINE", "STATE", "PROVIDER", "GPU", "ZONE", "AGE", "COST SO FAR"),
            rows,
            title="Machines",
        )


def _recent(tasks: Iterable[task_pb2.TaskInfo]) -> None:
    rows = []
    for t in tasks:
        state = state_from_proto(t.state)
        ran = t.attempts[-1] if t.attempts else None
        where = (ran.machine_name or ran.agent_id) if ran is not None else ""
        first = (t.error_message.splitlines() or [""])[0]
        error = f"{t.error_code}: {first}" if t.error_code else ""
        rows.append((t.task_id, t.tenant, t.workload, state.name if state else "", where, error))
    if rows:
        print_table(
            ("TASK", "TENANT", "WORKLOAD", "STATE", "RAN ON", "ERROR"), rows, title="Recent tasks"
        )

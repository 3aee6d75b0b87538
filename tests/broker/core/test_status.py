"""The status logic, pure: queue lines, agents, machines, who sees what, queue positions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gpubroker.billing.vms import LiveMachine
from gpubroker.broker.core.placement import PlacementKey
from gpubroker.broker.core.registry import AgentSession, Lease
from gpubroker.broker.core.scheduler import FairQueue
from gpubroker.broker.core.status import (
    MachineState,
    Spend,
    TaskLine,
    agent_lines,
    build_status,
    machine_lines,
    queue_lines,
    recent_limit,
)
from gpubroker.broker.model import AgentInfo, GpuRequirement, Task, TaskState

NOW = datetime(2027, 1, 5, 12, 0, tzinfo=UTC)
L4 = PlacementKey("matmul", GpuRequirement("nvidia-l4"))
ANY = PlacementKey("echo", GpuRequirement())


def task(task_id: str, tenant: str) -> Task:
    return Task(
        id=task_id, tenant=tenant, workload="echo", params={}, priority=0,
        state=TaskState.QUEUED, attempt=0, inputs=(), outputs=(), input_bytes=0,
        output_bytes=0, created_at=NOW,
    )  # fmt: skip


def session(agent_id: str, slots: int, leased: list[str]) -> AgentSession:
    info = AgentInfo(agent_id, "nvidia-l4", 1 << 34, slots, frozenset({"matmul"}),
                     version="1.2", connected_at=NOW)  # fmt: skip
    found = AgentSession(info, models=frozenset({"m2", "m1"}))
    found.leases = {t: Lease(task(t, "a")) for t in leased}
    return found


def machine(name: str, connected: bool = False) -> LiveMachine:
    return LiveMachine(
        name, "gce", "us-central1-a", "nvidia-l4", True, 280_000_000,
        NOW - timedelta(minutes=5), NOW - timedelta(minutes=4),
        NOW - timedelta(minutes=3) if connected else None, 1_234,
    )  # fmt: skip


def test_queue_lines_group_by_tenant_workload_and_gpu_with_the_oldest_wait() -> None:
    queue = FairQueue()
    queue.push("t1", "a", 0, 1, key=L4, queued_at=100.0)
    queue.push("t2", "a", 0, 2, key=L4, queued_at=90.0)
    queue.push("t3", "b", 0, 3, key=L4, queued_at=110.0)
    queue.push("t4", "a", 0, 4, key=ANY, queued_at=115.0)

    everyone = queue_lines(queue.waiting(), now=120.0)
    mine = queue_lines(queue.waiting(), now=120.0, tenant="b")

    assert [(q.tenant, q.workload, q.gpu_type, q.depth, q.oldest_wait_s) for q in everyone] == [
        ("a", "matmul", "nvidia-l4", 2, 30.0),
        ("a", "echo", "", 1, 5.0),
        ("b", "matmul", "nvidia-l4", 1, 10.0),
    ]
    assert [(q.tenant, q.depth) for q in mine] == [("b", 1)]


def test_queue_positions_follow_the_fair_share_within_a_class() -> None:
    queue = FairQueue()
    for seq, (task_id, tenant) in enumerate([("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")]):
        queue.push(task_id, tenant, 0, seq, key=ANY)
    queue.push("other", "a", 0, 9, key=L4)
    queue.started("a")  # tenant a has a task running: b goes first

    places = queue.positions(["a1", "a2", "a3", "b1", "other", "gone"])

    assert places == {"b1": 1, "a1": 2, "a2": 3, "a3": 4, "other": 1}
    assert queue.position("a2") == 3
    assert len(queue) == 5  # reading positions takes nothing
    assert queue.pop() is not None and queue.pop() is not None
    assert queue.position("a1") is None


def test_agent_lines_count_busy_free_and_prefetched_slots() -> None:
    full = session("vm-1", slots=2, leased=["x", "y", "z"])
    idle = session("desk", slots=2, leased=[])

    lines = agent_lines([full, idle], machine_names=["vm-1"])

    assert [(a.agent_id, a.busy_slots, a.free_slots, a.prefetch_held) for a in lines] == [
        ("desk", 0, 2, 0),
        ("vm-1", 2, 0, 1),
    ]
    assert lines[1].machine_name == "vm-1" and lines[0].machine_name == ""
    assert lines[1].task_ids == ("x", "y", "z") and lines[1].models == ("m1", "m2")


def test_machine_states_and_ages() -> None:
    machines = [machine("boot"), machine("up"), machine("seen", connected=True), machine("bye")]

    lines = machine_lines(machines, connected=["up"], stopping=["bye"], now=NOW)

    assert [(m.name, m.state) for m in lines] == [
        ("boot", MachineState.BOOTING),
        ("up", MachineState.RUNNING),
        ("seen", MachineState.RUNNING),
        ("bye", MachineState.STOPPING),
    ]
    assert {m.age_s for m in lines} == {300.0} and lines[0].cost_nanousd == 1_234


def test_a_tenant_sees_only_its_share_and_an_operator_everything() -> None:
    queue = FairQueue()
    queue.push("t1", "a", 0, 1, key=ANY, queued_at=1.0)
    queue.push("t2", "b", 0, 2, key=ANY, queued_at=1.0)
    agents = agent_lines([session("vm-1", 2, ["r1"])], ["vm-1"])
    machines = machine_lines([machine("vm-1", connected=True), machine("new")], [], [], NOW)
    spend = Spend(10, 20, 1, 2, machines_today_nanousd=50, machines_month_nanousd=60,
                  idle_today_nanousd=40, idle_month_nanousd=40)  # fmt: skip
    recent = [TaskLine(task("t1", "a")), TaskLine(task("t2", "b"))]
    lines = queue_lines(queue.waiting(), 2.0)
    running = {"a": 1, "b": 3}

    tenant = build_status(
        now=NOW,
        tenant="a",
        operator=False,
        queue=lines,
        running=running,
        agents=agents,
        machines=machines,
        spend=spend,
        recent=recent,
    )
    operator = build_status(
        now=NOW,
        tenant="ops",
        operator=True,
        queue=lines,
        running=running,
        agents=agents,
        machines=machines,
        spend=spend,
        recent=recent,
    )

    assert [q.tenant for q in tenant.queue] == ["a"] and tenant.queued_tasks == 1
    assert tenant.running_tasks == 1
    assert tenant.agents == () and tenant.machines == ()
    assert (tenant.agent_count, tenant.free_slots) == (1, 1)
    assert (tenant.machine_counts.running, tenant.machine_counts.booting) == (1, 1)
    assert tenant.spend == Spend(10, 20, 1, 2)
    assert [line.task.id for line in tenant.recent_tasks] == ["t1"]
    assert operator.queued_tasks == 2 and operator.running_tasks == 4
    assert operator.agents == agents and operator.machines == machines
    assert operator.spend == spend and len(operator.recent_tasks) == 2


def test_recent_limit_defaults_and_caps() -> None:
    assert (recent_limit(0), recent_limit(5), recent_limit(10_000)) == (20, 5, 200)

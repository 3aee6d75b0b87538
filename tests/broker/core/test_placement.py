"""Placement: which agent may take which class, model affinity, fairness across classes, and
why a queued task waits. Pure: real sessions and queues, no server, a made-up clock."""

from __future__ import annotations

import pytest

from gpubroker.broker.core.capacity import Capacity, GpuOffer
from gpubroker.broker.core.placement import (
    PlacementKey,
    Round,
    match,
    may_run,
    waiting_reason,
)
from gpubroker.broker.core.registry import AgentRegistry, AgentSession
from gpubroker.broker.core.scheduler import FairQueue, Head
from gpubroker.broker.errors import NoMatchingGpuError
from gpubroker.broker.model import AgentInfo, GpuRequirement

GIB = 1 << 30
MODEL = "ab" * 32
MODEL_KEY = PlacementKey(f"model:{MODEL}", GpuRequirement())
ECHO = PlacementKey("echo", GpuRequirement())
L4 = PlacementKey("echo", GpuRequirement("nvidia-l4"))


def _agent(
    registry: AgentRegistry,
    agent_id: str,
    *,
    gpu_type: str = "cpu",
    memory: int = 0,
    workloads: tuple[str, ...] = ("echo",),
    credits: int = 1,
    runs_models: bool = False,
    models: frozenset[str] = frozenset(),
) -> AgentSession:
    info = AgentInfo(
        agent_id, gpu_type, memory, 1, frozenset(workloads), runs_models=runs_models, models=models
    )
    session = AgentSession(info, credits=credits, granted=True)
    registry.add(session)
    return session


def _round(registry: AgentRegistry, queue: FairQueue, now: float, wait_s: float = 2.0) -> Round:
    return match(registry.sessions(), queue, registry.holders, now, wait_s)


def _taken(result: Round) -> dict[str, list[str]]:
    return {s.agent_id: list(items) for s, items in result.claims.items()}


def test_an_agent_may_run_a_class_only_with_the_workload_and_a_fitting_gpu() -> None:
    info = AgentInfo("a", "nvidia-l4", 24 * GIB, 1, frozenset({"echo"}))

    assert may_run(info, ECHO)
    assert may_run(info, L4)
    assert may_run(info, PlacementKey("echo", GpuRequirement(None, 16 * GIB)))
    assert not may_run(info, PlacementKey("echo", GpuRequirement(None, 40 * GIB)))
    assert not may_run(info, PlacementKey("matmul", GpuRequirement()))
    assert not may_run(info, MODEL_KEY)  # it does not run uploaded models
    assert may_run(AgentInfo("m", "cpu", 0, 1, frozenset(), runs_models=True), MODEL_KEY)


def test_a_task_requiring_an_l4_never_goes_to_a_cpu_agent_and_blocks_nothing_behind_it() -> None:
    registry, queue = AgentRegistry(), FairQueue()
    _agent(registry, "cpu", credits=2)
    queue.push("needs-l4", "t", 0, 1, key=L4)
    queue.push("any", "t", 0, 2, key=ECHO)

    first = _round(registry, queue, now=0.0)
    _agent(registry, "l4", gpu_type="nvidia-l4", memory=24 * GIB)
    second = _round(registry, queue, now=0.0)

    assert _taken(first) == {"cpu": ["any"]}
    assert _taken(second) == {"l4": ["needs-l4"]}
    assert len(queue) == 0


def test_a_workload_only_one_agent_advertises_goes_only_to_that_agent() -> None:
    registry, queue = AgentRegistry(), FairQueue()
    _agent(registry, "plain", credits=5)
    _agent(registry, "special", workloads=("echo", "special"), credits=1)
    for i in range(3):
        queue.push(f"s{i}", "t", 0, i, key=PlacementKey("special", GpuRequirement()))

    result = _round(registry, queue, now=0.0)

    assert _taken(result) == {"special": ["s0"]}
    assert len(queue) == 2


def test_thousands_of_unplaceable_tasks_cost_one_check_per_pop() -> None:
    registry, queue = AgentRegistry(), FairQueue()
    _agent(registry, "cpu", credits=1)
    for i in range(5000):
        queue.push(f"h{i}", "t", 0, i, key=PlacementKey("echo", GpuRequirement("nvidia-h100")))
    queue.push("ok", "t", 0, 9999, key=ECHO)
    asked: list[Head] = []

    def accept(head: Head) -> bool:
        asked.append(head)
        return head.key == ECHO

    item = queue.pop(accept)

    assert item == ("ok", "t")
    assert len(asked) == 2  # one head per class, not one per task


def test_fair_share_across_tenants_holds_across_classes() -> None:
    queue = FairQueue()
    queue.started("busy")
    queue.push("busy-urgent", "busy", 100, 1, key=ECHO)
    queue.push("idle-normal", "idle", 0, 2, key=L4)
    queue.push("idle-later", "idle", 5, 3, key=ECHO)

    order = []
    while (item := queue.pop()) is not None:
        queue.started(item[1])  # as a dispatch round does
        order.append(item)

    # idle runs nothing, so its best task (by priority, across its classes) goes first
    assert order == [("idle-later", "idle"), ("busy-urgent", "busy"), ("idle-normal", "idle")]


def test_a_model_task_prefers_a_connected_holder_even_when_another_agent_is_free() -> None:
    registry, queue = AgentRegistry(), FairQueue()
    _agent(registry, "other", runs_models=True, credits=3)
    holder = _agent(registry, "holder", runs_models=True, models=frozenset({MODEL}), credits=0)
    queue.push("m", "t", 0, 1, key=MODEL_KEY, queued_at=10.0)
    queue.push("e", "t", 0, 2, key=ECHO, queued_at=10.0)

    held = _round(registry, queue, now=10.5)
    holder.credits = 1
    served = _round(registry, queue, now=10.6)

    assert _taken(held) == {"other": ["e"]}  # other work keeps flowing meanwhile
    assert held.wake_at == 12.0
    assert _taken(served) == {"holder": ["m"]}


def test_a_model_task_goes_to_any_agent_once_its_bounded_wait_is_over() -> None:
    registry, queue = AgentRegistry(), FairQueue()
    _agent(registry, "other", runs_models=True)
    _agent(registry, "holder", runs_models=True, models=frozenset({MODEL}), credits=0)
    queue.push("m", "t", 0, 1, key=MODEL_KEY, queued_at=10.0)

    result = _round(registry, queue, now=12.0)

    assert _taken(result) == {"other": ["m"]}
    assert result.wake_at is None


@pytest.mark.parametrize("wait_s", [0.0, 2.0])
def test_a_model_task_waits_for_no_holder_when_none_is_connected_or_affinity_is_off(
    wait_s: float,
) -> None:
    registry, queue = AgentRegistry(), FairQueue()
    _agent(registry, "other", runs_models=True)
    if wait_s == 0.0:
        _agent(registry, "holder", runs_models=True, models=frozenset({MODEL}), credits=0)
    queue.push("m", "t", 0, 1, key=MODEL_KEY, queued_at=10.0)

    result = _round(registry, queue, now=10.1, wait_s=wait_s)

    assert _taken(result) == {"other": ["m"]}


def test_a_holder_that_dropped_the_model_no_longer_holds_tasks_back() -> None:
    registry, queue = AgentRegistry(), FairQueue()
    _agent(registry, "other", runs_models=True)
    holder = _agent(registry, "holder", runs_models=True, models=frozenset({MODEL}), credits=0)
    queue.push("m", "t", 0, 1, key=MODEL_KEY, queued_at=10.0)

    changed = registry.set_models(holder, [])
    result = _round(registry, queue, now=10.1)

    assert changed
    assert registry.holders(MODEL) == frozenset()
    assert _taken(result) == {"other": ["m"]}


def test_waiting_reasons_say_what_a_queued_task_waits_for() -> None:
    registry = AgentRegistry()
    _agent(registry, "cpu", runs_models=True)
    holder = _agent(registry, "holder", runs_models=True, models=frozenset({MODEL}), credits=0)

    def reason(key: PlacementKey, booting: str | None = None, now: float = 0.0) -> str:
        holders = registry.holders(MODEL) if key.model_id else ()
        return waiting_reason(key, 0.0, registry.sessions(), holders, booting, now, 2.0)

    assert reason(L4, booting="nvidia-l4") == "waiting for an nvidia-l4 VM to boot"
    assert reason(L4) == "waiting for an agent with nvidia-l4"
    assert reason(PlacementKey("x", GpuRequirement())) == (
        "waiting for an agent that runs workload 'x'"
    )
    assert reason(MODEL_KEY) == "waiting for an agent that holds its model (up to 2 s)"
    assert reason(MODEL_KEY, now=3.0) == ""
    assert reason(ECHO) == ""
    assert holder.agent_id == "holder"


def test_a_requirement_no_known_gpu_fits_is_refused_naming_what_is_available() -> None:
    capacity = Capacity()
    capacity.check(GpuRequirement("nvidia-h100-80gb"))  # nothing known yet: accepted
    capacity.configure([GpuOffer("nvidia-l4", 24 * GIB)])
    capacity.saw(AgentInfo("a", "cpu", 31 * GIB, 1, frozenset()))

    capacity.check(GpuRequirement(None, 20 * GIB))
    with pytest.raises(NoMatchingGpuError) as excinfo:
        capacity.check(GpuRequirement("nvidia-h100-80gb"))

    assert str(excinfo.value) == (
        "no GPU type matches nvidia-h100-80gb; available: cpu (31 GiB), nvidia-l4 (24 GiB)"
    )

"""The fair queue: tenants share fairly, priority and age order a tenant's own tasks."""

from __future__ import annotations

from gpubroker.broker.core.scheduler import FairQueue


def _drain(queue: FairQueue) -> list[str]:
    order = []
    while (item := queue.pop()) is not None:
        order.append(item[0])
    return order


def test_one_tenants_tasks_run_by_priority_then_age() -> None:
    queue = FairQueue()
    queue.push("low-old", "a", priority=0, seq=1)
    queue.push("high", "a", priority=5, seq=2)
    queue.push("low-new", "a", priority=0, seq=3)

    assert _drain(queue) == ["high", "low-old", "low-new"]


def test_tenants_take_turns_regardless_of_how_much_each_queued() -> None:
    queue = FairQueue()
    for i in range(4):
        queue.push(f"a{i}", "a", priority=0, seq=i)
    queue.push("b0", "b", priority=0, seq=10)

    first_two = {queue.pop(), queue.pop()}

    assert first_two == {("a0", "a"), ("b0", "b")}


def test_a_tenant_cannot_jump_ahead_of_others_with_a_high_priority() -> None:
    queue = FairQueue()
    queue.started("a")
    queue.push("a-urgent", "a", priority=100, seq=1)
    queue.push("b-normal", "b", priority=0, seq=2)

    assert queue.pop() == ("b-normal", "b")


def test_the_tenant_with_fewer_running_tasks_goes_next() -> None:
    queue = FairQueue()
    queue.started("a")
    queue.started("a")
    queue.started("b")
    queue.push("a1", "a", priority=0, seq=1)
    queue.push("b1", "b", priority=0, seq=2)

    assert queue.pop() == ("b1", "b")
    queue.finished("a")
    queue.finished("a")
    assert queue.running("a") == 0


def test_removed_tasks_are_skipped_and_not_counted() -> None:
    queue = FairQueue()
    queue.push("x", "a", priority=0, seq=1)
    queue.push("y", "a", priority=0, seq=2)

    assert queue.remove("x")
    assert not queue.remove("x")
    assert len(queue) == 1
    assert "x" not in queue
    assert _drain(queue) == ["y"]


def test_pushing_a_queued_task_twice_queues_it_once() -> None:
    queue = FairQueue()
    queue.push("x", "a", priority=0, seq=1)
    queue.push("x", "a", priority=0, seq=1)

    assert _drain(queue) == ["x"]

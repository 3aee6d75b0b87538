"""Many tasks from several tenants at once, and one very large tensor, end to end."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from gpubroker.billing.models import task_attempts, tasks, usage
from gpubroker.client import Client
from tests.support.cluster import AgentProcess, BrokerProcess

pytestmark = pytest.mark.slow  # end to end: real broker (and agent) processes

CLIENTS = 4
TASKS_PER_CLIENT = 50


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path).start()
    agents = [
        AgentProcess(tmp_path, broker.address, f"load-{i}", slots=4).start() for i in range(2)
    ]
    try:
        yield broker
    finally:
        for agent in agents:
            agent.stop()
        broker.stop()


def _submit_and_check(address: str, api_key: str, offset: int) -> list[str]:
    with Client(address, api_key) as client:
        handles = [
            (
                client.submit("add", [torch.tensor([float(offset + i)]), torch.tensor([0.5])]),
                offset + i,
            )
            for i in range(TASKS_PER_CLIENT)
        ]
        for handle, value in handles:
            assert handle.result(timeout=120).output.item() == value + 0.5
        return [handle.task_id for handle, _ in handles]


def test_200_concurrent_tasks_from_4_clients_complete_and_are_billed_exactly_once(
    cluster: BrokerProcess,
) -> None:
    keys = ["key-a", "key-b", "key-c", "key-d"]

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        futures = [
            pool.submit(_submit_and_check, cluster.address, key, 1000 * n)
            for n, key in enumerate(keys)
        ]
        task_ids = [tid for f in futures for tid in f.result()]

    assert len(set(task_ids)) == CLIENTS * TASKS_PER_CLIENT
    engine = sa.create_engine(cluster.database_url)
    with engine.connect() as conn:
        states = dict(conn.execute(sa.select(tasks.c.id, tasks.c.state)).all())
        final = dict(conn.execute(sa.select(tasks.c.id, tasks.c.attempt)).all())
        # Attempts that went back to the queue, and why: only recalls of prefetched tasks to an
        # idle agent are expected here, never a lost or rejected one.
        requeued = conn.execute(
            sa.select(task_attempts.c.task_id, task_attempts.c.attempt, task_attempts.c.outcome)
        ).all()
        billed = conn.execute(sa.select(usage.c.task_id)).scalars().all()
        per_tenant: dict[str, int] = dict(
            conn.execute(sa.select(usage.c.tenant, sa.func.count()).group_by(usage.c.tenant)).all()
        )
    engine.dispose()
    assert set(states) == set(task_ids)
    assert set(states.values()) == {"succeeded"}
    earlier = {(t, a) for t, a, _ in requeued if a < final[t]}
    assert earlier == {(t, a) for t, n in final.items() for a in range(1, n)}
    assert {outcome for t, a, outcome in requeued if (t, a) in earlier} <= {"recalled"}
    assert sorted(billed) == sorted(task_ids)
    assert per_tenant == {f"tenant-{c}": TASKS_PER_CLIENT for c in "abcd"}


def test_a_300_megabyte_tensor_round_trips_bit_exact(cluster: BrokerProcess) -> None:
    tensor = torch.randint(-(2**31), 2**31 - 1, (75_000_000,), dtype=torch.int32)  # 300 MB

    with Client(cluster.address, "key-a") as client:
        result = client.run("echo", [tensor], timeout=600)

    output = result.output
    assert output.dtype == torch.int32 and output.shape == tensor.shape
    assert torch.equal(output, tensor)


def test_each_tenant_sees_only_its_own_usage_and_it_matches_the_ledger(
    cluster: BrokerProcess,
) -> None:
    with Client(cluster.address, "key-a") as alpha, Client(cluster.address, "key-b") as beta:
        for _ in range(3):
            alpha.run("sum", [torch.ones(1000)], timeout=60)
        beta.run("sum", [torch.ones(10)], timeout=60)

        mine, theirs = alpha.usage(), beta.usage()
        future = alpha.usage(since=datetime.now(UTC) + timedelta(days=1))

    engine = sa.create_engine(cluster.database_url)
    with engine.connect() as conn:
        ledger = conn.execute(
            sa.select(sa.func.sum(usage.c.cost_nanousd), sa.func.count()).where(
                usage.c.tenant == "tenant-a"
            )
        ).one()
    engine.dispose()
    assert (mine.tenant, mine.tasks, theirs.tenant, theirs.tasks) == ("tenant-a", 3, "tenant-b", 1)
    assert mine.cost_usd == Decimal(ledger[0]).scaleb(-9) and mine.tasks == ledger[1]
    assert mine.bytes_in == 3 * 4000 and mine.compute_seconds > 0
    assert future.tasks == 0 and future.cost_usd == 0
    assert mine.monthly_budget_usd is None and mine.month_to_date_usd == mine.cost_usd
    assert future.month_to_date_usd == mine.cost_usd  # the month, whatever the range

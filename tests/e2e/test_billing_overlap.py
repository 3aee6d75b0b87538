"""End to end: two tasks sharing one agent's device are billed no more than it was busy.

A broker process and one two-slot agent process; two one-second sleeps run at once on the
agent. Each task's compute window lies inside the span the broker saw it running (claimed to
succeeded), so the union of those spans bounds the agent's busy time from above.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from gpubroker.billing.models import usage
from gpubroker.client import Client
from tests.support.cluster import broker_with_agent

pytestmark = pytest.mark.slow  # end to end: real broker and agent processes

SLEEP_S = 1.0


def _union_seconds(spans: list[tuple[datetime, datetime]]) -> float:
    total, reached = 0.0, None
    for begin, end in sorted(spans):
        if reached is None or begin > reached:
            total, reached = total + (end - begin).total_seconds(), end
        elif end > reached:
            total, reached = total + (end - reached).total_seconds(), end
    return total


def test_two_overlapping_tasks_on_one_agent_are_billed_at_most_its_busy_time(
    tmp_path: Path,
) -> None:
    with (
        broker_with_agent(tmp_path, "agent-0", slots=2) as broker,
        Client(broker.address, "key-a") as client,
    ):
        client.run("echo", [torch.zeros(1)], timeout=60)  # the agent is up and serving
        handles = [client.submit("sleep", [torch.ones(1)], seconds=SLEEP_S) for _ in range(2)]
        for handle in handles:
            handle.result(timeout=60)
        statuses = [handle.status() for handle in handles]
        engine = sa.create_engine(broker.database_url)
        with engine.connect() as conn:
            query = sa.select(usage.c.task_id, usage.c.compute_seconds).where(
                usage.c.task_id.in_([handle.task_id for handle in handles])
            )
            billed: dict[str, float] = {
                row.task_id: row.compute_seconds for row in conn.execute(query)
            }
        engine.dispose()

    spans = [(s.started_at, s.finished_at) for s in statuses if s.started_at and s.finished_at]
    assert len(spans) == 2 and len(billed) == 2
    (first_begin, first_end), (second_begin, second_end) = spans
    assert first_begin < second_end and second_begin < first_end  # they ran at the same time
    assert sum(billed.values()) <= _union_seconds(spans)  # not 2 s for ~1 s of a busy device
    assert sum(billed.values()) >= SLEEP_S  # the device was busy at least one whole sleep
    assert all(seconds < SLEEP_S for seconds in billed.values())  # each paid part of the overlap
    assert {s.task_id: s.compute_seconds for s in statuses} == billed  # what the tenant sees

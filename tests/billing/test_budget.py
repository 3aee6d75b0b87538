"""Monthly budgets: month boundaries, spend against the limit, and refusal at submit."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from gpubroker.billing.__main__ import cli
from gpubroker.billing.budget import (
    budget_status,
    month_start,
    next_month,
    remove_budget,
    set_budget,
)
from gpubroker.billing.ledger import UsageRecord, record_usage
from gpubroker.billing.prices import PriceCatalog
from gpubroker.broker.errors import BudgetExceededError
from gpubroker.broker.model import TaskSpec
from gpubroker.broker.storage.store import TaskStore
from gpubroker.protos.wire import TensorMeta

NOW = datetime(2026, 12, 15, 9, 30, tzinfo=UTC)


def _spend(conn: sa.Connection, task_id: str, seconds: float, when: datetime) -> None:
    record = UsageRecord(task_id, "t", "matmul", "a", "nvidia-l4", 1, 0.0, seconds, 1, 1)
    record_usage(conn, record, PriceCatalog.load(), when)


def test_months_are_utc_calendar_months_and_december_rolls_over() -> None:
    assert month_start(NOW) == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_month(NOW) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_month(datetime(2026, 1, 31, 23, tzinfo=UTC)) == datetime(2026, 2, 1, tzinfo=UTC)


def test_spend_counts_only_this_months_usage(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        set_budget(conn, "t", 20_000_000, NOW)
        _spend(conn, "last-month", 3600.0, NOW - timedelta(days=30))
        _spend(conn, "this-month", 90.0, NOW)

    with engine.connect() as conn:
        status = budget_status(conn, "t", NOW)

    assert (status.limit_nanousd, status.spent_nanousd) == (20_000_000, 17_750_000)
    assert not status.is_exhausted


def test_a_spent_budget_refuses_new_tasks_with_the_figures(engine: sa.Engine) -> None:
    store = TaskStore(engine, PriceCatalog.load())
    spec = TaskSpec("echo", (TensorMeta("uint8", (1,), 1, 0),))
    with engine.begin() as conn:
        set_budget(conn, "t", 17_750_000, NOW)
        _spend(conn, "earlier", 90.0, NOW)

    with pytest.raises(BudgetExceededError, match=r"spent \$0.017750000 of its monthly budget"):
        store.create("refused", "t", spec, NOW, None)
    task, _ = store.create("other-tenant", "u", spec, NOW, None)
    with engine.begin() as conn:
        remove_budget(conn, "t")
    allowed, _ = store.create("after-removal", "t", spec, NOW, None)

    assert task.tenant == "u" and allowed.tenant == "t"


def test_a_retried_submit_gets_its_task_even_once_the_budget_is_spent(
    engine: sa.Engine,
) -> None:
    store = TaskStore(engine, PriceCatalog.load())
    spec = TaskSpec("echo", (TensorMeta("uint8", (1,), 1, 0),), request_id="r-1")
    first, _ = store.create("before", "t", spec, NOW, None)
    with engine.begin() as conn:
        set_budget(conn, "t", 17_750_000, NOW)
        _spend(conn, "earlier", 90.0, NOW)

    again, deduplicated = store.create("retry", "t", spec, NOW, None)

    assert deduplicated and again.id == first.id == "before"
    with pytest.raises(BudgetExceededError):
        store.create("new", "t", TaskSpec("echo", spec.inputs, request_id="r-2"), NOW, None)


def test_the_cli_sets_shows_and_removes_budgets(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate", "--database-url", url]).exit_code == 0

    set_out = runner.invoke(cli, ["budget", "set", "acme", "25", "--database-url", url]).output
    show_out = runner.invoke(cli, ["budget", "show", "acme", "--database-url", url]).output
    bad = runner.invoke(cli, ["budget", "set", "acme", "-3", "--database-url", url])
    gone = runner.invoke(cli, ["budget", "remove", "acme", "--database-url", url]).output

    assert "monthly budget $25.000000000" in set_out
    assert "spent $0.000000000" in show_out and "$25.000000000" in show_out
    assert bad.exit_code != 0
    assert "budget removed" in gone
    shown = json.loads(
        runner.invoke(cli, ["budget", "show", "acme", "--json", "--database-url", url]).stdout
    )
    assert (shown["tenant"], shown["limit_nanousd"], shown["spent_nanousd"]) == ("acme", None, 0)


def test_grpc_status_for_a_spent_budget_is_resource_exhausted() -> None:
    from gpubroker.broker.api.convert import status_for

    assert status_for(BudgetExceededError("spent")) == grpc.StatusCode.RESOURCE_EXHAUSTED

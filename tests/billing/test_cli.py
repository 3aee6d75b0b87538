"""``python -m gpubroker.billing report`` on a real database file."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from gpubroker.billing.__main__ import cli
from gpubroker.billing.ledger import UsageRecord, record_usage
from gpubroker.billing.models import metadata
from gpubroker.billing.prices import PriceCatalog
from tests.support.paths import REPO_ROOT


def _database(tmp_path: Path, *, with_usage: bool = True) -> str:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    catalog = PriceCatalog.load()
    usage = [("alpha", 90.0), ("alpha", 30.0), ("beta", 7.2)] if with_usage else []
    with engine.begin() as conn:
        for i, (tenant, seconds) in enumerate(usage):
            gpu = "nvidia-l4" if tenant == "alpha" else "cpu"
            record = UsageRecord(f"t{i}", tenant, "matmul", "a", gpu, 1, 1.0, seconds, 10, 5)
            record_usage(conn, record, catalog, datetime(2026, 11, 24, tzinfo=UTC))
    engine.dispose()
    return url


def _report(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["report", "--database-url", url, *args])


def test_the_table_prints_each_tenant_and_an_exact_total(tmp_path: Path) -> None:
    url = _database(tmp_path)

    result = _report(url)

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("alpha" in line and "$0.023666667" in line for line in lines)
    assert any("beta" in line and "$0.000100000" in line for line in lines)
    assert any("TOTAL" in line and "$0.023766667" in line for line in lines)


def test_the_csv_has_one_row_per_tenant_and_a_total_that_adds_up(tmp_path: Path) -> None:
    url = _database(tmp_path)

    result = _report(url, "--format", "csv")

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [(r["tenant"], r["tasks"], r["cost_usd"]) for r in rows] == [
        ("alpha", "2", "0.023666667"),  # 0.017750000 + 0.005916667
        ("beta", "1", "0.000100000"),
        ("TOTAL", "3", "0.023766667"),
    ]
    assert rows[-1]["bytes_in"] == "30"


def test_the_csv_can_group_by_gpu_type(tmp_path: Path) -> None:
    url = _database(tmp_path)

    result = _report(url, "--by", "gpu_type", "--format", "csv")

    assert [r.split(",")[0] for r in result.output.splitlines()] == [
        "gpu_type",
        "cpu",
        "nvidia-l4",
        "TOTAL",
    ]


def test_the_json_keeps_counts_as_integers_and_money_as_exact_strings(tmp_path: Path) -> None:
    url = _database(tmp_path)

    result = _report(url, "--format", "json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [g["tenant"] for g in report["groups"]] == ["alpha", "beta"]
    assert report["total"]["tasks"] == 3
    assert report["total"]["cost_usd"] == "0.023766667"
    assert report["total"]["cost_nanousd"] == 23_766_667
    assert report["total"]["compute_s"] == 127.2


def test_a_time_range_with_no_usage_prints_zero_totals(tmp_path: Path) -> None:
    url = _database(tmp_path)

    result = _report(url, "--since", "2027-01-01", "--format", "csv")

    assert result.exit_code == 0
    assert result.output.splitlines() == [
        "tenant,tasks,compute_s,mean_queue_wait_s,bytes_in,bytes_out,cost_usd",
        "TOTAL,0,0.000000,0.000,0,0,0.000000000",
    ]


def test_a_database_with_no_usage_prints_an_empty_table_with_zero_totals(tmp_path: Path) -> None:
    url = _database(tmp_path, with_usage=False)

    result = _report(url)

    assert result.exit_code == 0, result.output
    (total,) = [line for line in result.output.splitlines() if "TOTAL" in line]
    assert "$0.000000000" in total


def test_a_missing_database_is_a_clear_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nope.db"

    result = _report(f"sqlite:///{path}")

    assert result.exit_code == 1
    assert "no database at" in result.output
    assert not path.exists()


def test_a_database_without_a_usage_table_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE unrelated (id INTEGER)"))
    engine.dispose()

    result = _report(url)

    assert result.exit_code == 1
    assert "has no usage table" in result.output


def test_a_malformed_since_is_a_usage_error(tmp_path: Path) -> None:
    result = _report(_database(tmp_path), "--since", "last tuesday")

    assert result.exit_code == 2
    assert "not an ISO 8601" in result.output


@pytest.mark.slow  # a python -m process
def test_python_m_billing_reads_the_database_url_from_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "GPUBROKER_DATABASE_URL": _database(tmp_path)}

    result = subprocess.run(
        [sys.executable, "-m", "gpubroker.billing", "report", "--format", "csv"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "TOTAL,3,127.200000,1.000,30,15,0.023766667"


@pytest.mark.slow  # a python -m process
def test_without_a_url_the_report_looks_for_the_brokers_default_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPUBROKER_DATABASE_URL"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["GPUBROKER_DATA_DIR"] = str(tmp_path / "data")

    result = subprocess.run(
        [sys.executable, "-m", "gpubroker.billing", "report"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 1
    assert f"no database at sqlite:///{tmp_path / 'data' / 'broker.db'}" in result.stderr
    assert not (tmp_path / "data").exists()


def test_the_report_reads_postgresql_as_well_as_sqlite(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        record = UsageRecord("pg", "gamma", "matmul", "a", "nvidia-l4", 1, 0.5, 90.0, 1, 2)
        record_usage(conn, record, PriceCatalog.load(), datetime(2026, 11, 24, tzinfo=UTC))

    result = _report(engine.url.render_as_string(hide_password=False), "--format", "csv")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:] == [
        "gamma,1,90.000000,0.500,1,2,0.017750000",
        "TOTAL,1,90.000000,0.500,1,2,0.017750000",
    ]

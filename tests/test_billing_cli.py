"""``python -m billing report`` on a real database file."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner

from billing.__main__ import cli
from billing.ledger import UsageRecord, record_usage
from billing.models import metadata
from billing.prices import PriceCatalog


def _database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    catalog = PriceCatalog.load()
    with engine.begin() as conn:
        for i, (tenant, seconds) in enumerate([("alpha", 90.0), ("alpha", 30.0), ("beta", 7.2)]):
            gpu = "nvidia-l4" if tenant == "alpha" else "cpu"
            record = UsageRecord(f"t{i}", tenant, "matmul", "a", gpu, 1, 1.0, seconds, 10, 5)
            record_usage(conn, record, catalog, datetime(2026, 11, 24, tzinfo=UTC))
    engine.dispose()
    return url


def test_the_report_prints_each_tenant_and_an_exact_total(tmp_path: Path) -> None:
    url = _database(tmp_path)

    table = CliRunner().invoke(cli, ["report", "--database-url", url])
    as_csv = CliRunner().invoke(cli, ["report", "--database-url", url, "--format", "csv"])
    as_json = CliRunner().invoke(cli, ["report", "--database-url", url, "--format", "json"])

    assert table.exit_code == 0, table.output
    assert "alpha" in table.output and "$0.023666667" in table.output
    rows = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert [r["tenant"] for r in rows] == ["alpha", "beta", "TOTAL"]
    by_gpu = CliRunner().invoke(
        cli, ["report", "--database-url", url, "--by", "gpu_type", "--format", "csv"]
    )
    assert [r.split(",")[0] for r in by_gpu.output.splitlines()] == [
        "gpu_type",
        "cpu",
        "nvidia-l4",
        "TOTAL",
    ]
    assert rows[-1]["cost_usd"] == "0.023766667"  # 0.017750000 + 0.005916667 + 0.000100000
    report = json.loads(as_json.output)
    assert report["total"]["tasks"] == "3"


def test_a_time_range_with_no_usage_prints_zero_totals(tmp_path: Path) -> None:
    url = _database(tmp_path)

    result = CliRunner().invoke(
        cli, ["report", "--database-url", url, "--since", "2027-01-01", "--format", "csv"]
    )

    assert result.exit_code == 0
    assert result.output.splitlines()[-1].startswith("TOTAL,0,")


def test_a_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["report", "--database-url", f"sqlite:///{tmp_path / 'nope.db'}"]
    )

    assert result.exit_code == 1
    assert "no database" in result.output

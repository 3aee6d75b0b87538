"""Metrics and logs of real processes: the broker's and an agent's /metrics scraped and parsed,
the shipped Grafana dashboard's queries checked against the names those scrapes return, JSON
log lines that name the task, gRPC's C-core lines routed through the log, and a refused agent
join logged once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from gpubroker.client import Client, FailedPreconditionError
from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.paths import REPO_ROOT
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # end to end: real broker and agent processes

TOKEN = "right-token"
GOOD, BAD = "metrics-agent", "wrong-token-agent"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "gpubroker.json"
SCRAPE_CONFIG = REPO_ROOT / "deploy" / "prometheus.yml"
NVML_ONLY = frozenset(
    {
        "gpubroker_agent_gpu_utilization_ratio",
        "gpubroker_agent_gpu_memory_used_bytes",
        "gpubroker_agent_gpu_memory_total_bytes",
    }
)
"""Reported only by an agent on a CUDA device with nvidia-ml-py: absent from a CPU scrape."""


def _records(log: str) -> list[dict[str, Any]]:
    """Every line of a JSON log, parsed (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in log.splitlines() if line.strip()]


def _port(records: list[dict[str, Any]], pattern: str) -> int | None:
    for record in records:
        if found := re.search(pattern, record["message"]):
            return int(found.group(1))
    return None


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[BrokerProcess, AgentProcess]]:
    root = tmp_path_factory.mktemp("observability")
    env = {
        "GPUBROKER_METRICS": "127.0.0.1:0",
        "GPUBROKER_LOG_FORMAT": "json",
        "GPUBROKER_JOIN_TOKEN": TOKEN,
    }
    broker = BrokerProcess(root, env=env).start()
    json_logs = ["--log-format", "json"]
    good = AgentProcess(
        root, broker.address, GOOD, slots=2,
        extra_args=["--join-token", TOKEN, "--metrics", "127.0.0.1:0", *json_logs],
    ).start()  # fmt: skip
    bad = AgentProcess(
        root, broker.address, BAD, extra_args=["--join-token", "wrong", *json_logs]
    ).start()
    try:
        wait_until(lambda: f"agent {GOOD} connected" in broker.log(), 90, "the agent to connect")
        yield broker, good
    finally:
        bad.stop()
        good.stop()
        broker.stop()


def _scrape(port: int) -> tuple[str, dict[str, list[tuple[dict[str, str], float]]], set[str]]:
    """The text, samples by name, and every name a query may use (families without samples
    included: a counter's ``_total``, a histogram's ``_bucket``, ``_sum`` and ``_count``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names.update(family.name + s for s in suffixes.get(family.type, []))
        for sample in family.samples:
            names.add(sample.name)
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return text, samples, names


def _ports(broker: BrokerProcess, agent: AgentProcess) -> tuple[int, int]:
    broker_port = _port(_records(broker.log()), r"metrics: (\d+)")
    agent_port = _port(_records(agent.log()), r"serving /metrics on [^:]+:(\d+)")
    assert broker_port and agent_port, "the processes did not log their metrics ports"
    return broker_port, agent_port


def _run_one(broker: BrokerProcess) -> str:
    with Client(broker.address, "key-a") as client:
        handle = client.submit("echo", [torch.arange(6, dtype=torch.float32)])
        handle.result(timeout=60)
        return handle.task_id


def test_both_metrics_endpoints_parse_and_the_dashboard_queries_only_names_they_return(
    cluster: tuple[BrokerProcess, AgentProcess],
) -> None:
    broker, agent = cluster
    _run_one(broker)
    broker_port, agent_port = _ports(broker, agent)

    _, broker_samples, broker_names = _scrape(broker_port)
    _, agent_samples, agent_names = _scrape(agent_port)

    assert broker_samples["gpubroker_agents_connected"][0][1] == 1.0
    assert broker_samples["gpubroker_free_slots"][0][1] == 2.0
    billed = broker_samples["gpubroker_billed_compute_seconds_total"]
    assert [labels["tenant"] for labels, _ in billed] == ["tenant-a"]
    assert agent_samples["gpubroker_agent_slots"][0][1] == 2.0
    assert agent_samples["gpubroker_agent_slot_busy_seconds_total"][0][1] > 0
    assert agent_samples["gpubroker_agent_info"][0][0]["agent_id"] == GOOD
    assert "gpubroker_agent_model_cache_hits_total" in agent_names

    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for q in queries for n in re.findall(r"\bgpubroker_[a-z0-9_]+", q)}
    assert len(used) > 20
    missing = used - broker_names - agent_names - NVML_ONLY
    assert not missing, f"dashboard queries name metrics no scrape returns: {sorted(missing)}"
    source = (REPO_ROOT / "gpu_agent" / "metrics.py").read_text()
    assert all(f'"{name}"' in source for name in NVML_ONLY)
    config = SCRAPE_CONFIG.read_text()
    assert "job_name: gpubroker-broker" in config and "job_name: gpubroker-agents" in config
    for job in re.findall(r'"(\$\w+)"|(\$\w+)', json.dumps(queries)):
        assert any(
            v["name"] == (job[0] or job[1]).lstrip("$") for v in dashboard["templating"]["list"]
        )


def test_json_lines_name_the_task_and_each_outcome_is_one_info_line(
    cluster: tuple[BrokerProcess, AgentProcess],
) -> None:
    broker, _ = cluster
    task_id = _run_one(broker)

    wait_until(lambda: task_id in broker.log(), 10, "the task's outcome line")
    records = _records(broker.log())
    about = [r for r in records if task_id in r["message"]]
    assert about and all(r.get("task_id") == task_id for r in about)
    outcomes = [r for r in about if r["logger"] == "gpubroker.broker.tasks"]
    assert len(outcomes) == 1
    outcome = outcomes[0]
    assert outcome["level"] == "INFO" and outcome["outcome"] == "succeeded"
    assert (outcome["tenant"], outcome["attempt"], outcome["agent"]) == ("tenant-a", 1, GOOD)
    assert outcome["duration_s"] >= outcome["compute_s"] > 0
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


def test_a_refused_join_is_logged_once_a_minute_however_often_the_agent_retries(
    cluster: tuple[BrokerProcess, AgentProcess],
) -> None:
    broker, _ = cluster
    bad_log = broker.root / f"agent-{BAD}.log"

    def retries() -> int:
        lines = _records(bad_log.read_text()) if bad_log.exists() else []
        return sum("UNAUTHENTICATED" in r["message"] for r in lines)

    wait_until(lambda: retries() >= 3, 60, "the agent with the wrong token to retry")
    refusals = [
        r for r in _records(broker.log()) if r["message"].startswith("refused an agent join")
    ]
    assert len(refusals) == 1
    assert refusals[0]["level"] == "WARNING" and "127.0.0.1" in refusals[0]["message"]


def test_grpc_core_lines_are_routed_through_the_log(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os
        from concurrent import futures
        from gpubroker.logformat import configure_logging
        configure_logging("INFO", "json")
        import grpc
        server = grpc.server(futures.ThreadPoolExecutor(1))
        try:
            server.add_insecure_port("256.0.0.1:0")  # the C core logs why it fails
        except RuntimeError:
            pass
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )

    assert done.returncode == 0, done.stderr
    records = _records(done.stderr)
    core = [r for r in records if r["logger"] == "grpc.core"]
    assert core and core[0]["level"] == "ERROR" and "256.0.0.1" in core[0]["message"]
    assert re.fullmatch(r"\w+\.cc:\d+", core[0]["source"])


def _broken_package(site: Path) -> None:
    """An installed distribution whose workload entry point names a module that is not there."""
    info = site / "broken_workloads-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-workloads\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[gpubroker.workloads]\nbroken.resize = broken_workloads_missing.ops:resize\n"
    )


def test_a_workload_that_fails_to_load_is_reported_and_its_tasks_fail_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    _broken_package(site)
    broker = BrokerProcess(tmp_path).start()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    agent = AgentProcess(tmp_path, broker.address, "broken-agent").start()
    try:
        wait_until(lambda: "agent broken-agent connected" in broker.log(), 90, "the agent")
        with Client(broker.address, "key-a") as client:
            started = time.monotonic()
            handle = client.submit("broken.resize", [torch.zeros(2)])
            with pytest.raises(FailedPreconditionError) as raised:
                handle.result(timeout=30)
            took = time.monotonic() - started
            assert client.submit("echo", [torch.ones(2)]).result(timeout=30).output.sum() == 2
    finally:
        agent.stop()
        broker.stop()

    assert "broken_workloads_missing" in str(raised.value) and "broken.resize" in str(raised.value)
    assert took < 10  # not a timeout
    warning = "agent broken-agent could not load workload broken.resize: entry point"
    assert warning in broker.log()

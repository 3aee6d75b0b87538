"""The broker's /metrics: served on /metrics only, parsed as Prometheus text, label values
bounded, free slots counting slots (not prefetch credit); the HTTP server's route hook."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpubroker.broker.metrics import Metrics
from gpubroker.broker.metrics_labels import OTHER, TenantLabels, workload_label
from gpubroker.broker.server import BrokerServer
from gpubroker.httpserver import HttpServer, Request, Response
from gpubroker.protos import agent_pb2
from tests.fakes.agent import JOIN_TOKEN, FakeAgent
from tests.support.rpc import submit
from tests.support.waiting import wait_for

KEYS = {f"key-{i}": f"tenant-{i}" for i in range(5)}


@pytest.fixture
def broker_overrides() -> dict[str, object]:
    return {
        "api_keys": KEYS,
        "join_token": JOIN_TOKEN,
        "metrics_address": "127.0.0.1:0",
        "metrics_tenant_limit": 2,
        "heartbeat_interval_s": 0.2,
        "lease_timeout_s": 1.0,
    }


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _scrape(server: BrokerServer) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert status == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        v for got, v in samples.get(name, []) if all(got.get(k) == x for k, x in labels.items())
    )


async def test_only_metrics_is_served_and_other_paths_are_404(broker_server: BrokerServer) -> None:
    base = f"http://127.0.0.1:{broker_server.metrics_port}"

    for path in ("/", "/metrics/", "/metrics.txt", "/favicon.ico", "/admin?x=1"):
        status, _ = await asyncio.to_thread(_get, base + path)
        assert status == 404, path
    status, text = await asyncio.to_thread(_get, base + "/metrics")
    assert status == 200 and "gpubroker_queue_depth" in text


async def test_free_slots_count_slots_not_prefetch_and_agents_show_by_state(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    agents = [
        await FakeAgent.ready(broker_channel, f"a{i}", slots=2, prefetch=32) for i in range(4)
    ]
    for agent in agents:
        agent.credit(33)  # slots + prefetch, as a real agent grants
    await wait_for(lambda: len(broker_server.registry) == 4, what="four agents")
    await wait_for(
        lambda: all(s.credits == 34 for s in broker_server.registry.sessions()),
        what="credit granted",
    )

    samples = await _scrape(broker_server)
    assert _value(samples, "gpubroker_free_slots") == 8.0  # not 4 x 34 credits
    assert _value(samples, "gpubroker_agents", state="idle") == 4.0

    await submit(broker_channel, b"x", key="key-0")
    sessions = broker_server.registry.sessions
    await wait_for(lambda: sum(s.busy for s in sessions()) == 1, what="the task assigned")
    samples = await _scrape(broker_server)
    assert _value(samples, "gpubroker_free_slots") == 7.0
    assert _value(samples, "gpubroker_busy_slots") == 1.0
    assert _value(samples, "gpubroker_agents", state="busy") == 1.0
    assert _value(samples, "gpubroker_agents", state="idle") == 3.0


async def test_tenant_labels_are_bounded_and_failures_carry_their_code(
    broker_channel: grpc.aio.Channel, broker_server: BrokerServer
) -> None:
    agent = await FakeAgent.ready(broker_channel, "a1", slots=1)
    for i in range(5):
        await submit(broker_channel, b"x", key=f"key-{i}")
    assignment = (await agent.next()).assignment
    await _fail(agent, assignment, "INVALID_ARGUMENT", "bad input")

    samples = await _scrape(broker_server)
    tenants = {labels["tenant"] for labels, _ in samples["gpubroker_tasks_submitted_total"]}
    assert tenants == {"tenant-0", "tenant-1", OTHER}  # the limit is 2
    assert _value(samples, "gpubroker_tasks_submitted_total", tenant=OTHER) == 3.0
    failures = samples["gpubroker_task_failures_total"]
    assert [(labels["code"], labels["state"]) for labels, _ in failures] == [
        ("INVALID_ARGUMENT", "failed")
    ]


async def _fail(
    agent: FakeAgent, assignment: agent_pb2.TaskAssignment, code: str, message: str
) -> None:
    attempt = agent_pb2.TaskAttempt(task_id=assignment.task_id, attempt=assignment.attempt)
    header = agent_pb2.ResultHeader(
        agent_id=agent.agent_id, attempt=attempt, error_code=code, error_message=message
    )
    request = agent_pb2.PutResultRequest(header=header)
    await agent.stub.PutResult(iter([request]), metadata=agent.metadata)


def test_named_tenants_get_labels_and_everyone_else_is_other() -> None:
    named = TenantLabels(["acme"], limit=100)
    first_two = TenantLabels(limit=2)

    assert [named(t) for t in ("acme", "globex", OTHER)] == ["acme", OTHER, OTHER]
    assert [first_two(t) for t in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]
    assert workload_label("model:" + "0" * 64) == "model"
    assert workload_label("matmul") == "matmul"


def test_counters_are_exported_with_their_total_suffix_once() -> None:
    metrics = Metrics()
    metrics.fallback("stockout", "us-central1-a", "nvidia-l4")
    metrics.decision("launch", "demand", "nvidia-l4", 2)
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["gpubroker_provider_fallbacks"].type == "counter"
    assert 'gpubroker_provider_fallbacks_total{gpu_type="nvidia-l4",reason="stockout"' in text
    assert "_total_total" not in text
    labels = 'action="launch",gpu_type="nvidia-l4",kind="demand"'
    assert f"gpubroker_autoscaler_decisions_total{{{labels}}} 2.0" in text
    # No "_created" twin per series: it doubles what Prometheus stores and nothing reads it.
    assert "_created" not in text


async def test_routes_answer_plain_and_coroutine_handlers_with_the_query() -> None:
    server = HttpServer("127.0.0.1:0", asyncio.get_running_loop())
    seen: list[Request] = []

    def plain(request: Request) -> tuple[int, str, bytes]:
        seen.append(request)
        return 200, "text/plain", request.param("name", "nobody").encode()

    async def on_loop(request: Request) -> Response:
        await asyncio.sleep(0)
        return Response(201, "application/json", b"{}", headers=(("Cache-Control", "no-store"),))

    server.add_route("/hello", plain)
    server.add_route("/status.json", on_loop)
    port = server.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert await asyncio.to_thread(_get, base + "/hello?name=ada") == (200, "ada")
        assert await asyncio.to_thread(_get, base + "/status.json") == (201, "{}")
        assert (await asyncio.to_thread(_get, base + "/nothing"))[0] == 404
        assert seen[0].headers.get("HOST") == f"127.0.0.1:{port}"  # case-insensitive
        with pytest.raises(ValueError, match="routed already"):
            server.add_route("/hello", plain)
    finally:
        server.close()

"""Hostile input: over a thousand generated malformed or adversarial requests against one broker.

Hypothesis draws each case with the exact status code it must get: wrong sizes, huge declared
shapes, ranks and dimensions, bad dtypes, truncated or overlong streams, bad checksums, streams
out of order, bad API keys, other tenants' task ids, oversize messages, bad params, priorities
and timeouts, and ``RunMany`` batches whose bad items must be refused alone. Valid tasks are
interleaved throughout; at the end every one must have succeeded with its own output, no
refused request may have left a task behind, and the broker must still report SERVING.

The broker runs in the test's event loop and a real agent process runs the ``echo`` workload.
Hypothesis runs in a worker thread and hands each case to the loop, where it is sent through
the raw generated stubs on one channel.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings

from gpubroker.protos import broker_pb2, task_pb2
from tests.e2e.hostile.cases import TENANT_KEYS, Case, Job, Tensor, inline_task
from tests.e2e.hostile.harness import Harness, assert_echoed, run_many, send_stream
from tests.e2e.hostile.strategies import batches
from tests.support.rpc import bearer

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

EXAMPLES = 28
"""Batches drawn. A batch holds one case per unit of family weight (54), in random order, so
about 1,500 cases in all, four in five hostile. Batches rather than single cases because
Hypothesis picks among families far from evenly; this way each family gets its share."""

# -- tests -----------------------------------------------------------------------------------


async def test_an_unknown_workload_is_refused_before_anything_runs(harness: Harness) -> None:
    before = len(await harness.tasks("key-a"))
    job = Job((Tensor("uint8", (2,), b"hi"),), 0, 0.0, ())
    header = job.header(workload="os.system")
    batch = broker_pb2.RunManyRequest(tasks=[inline_task(0, header, job.data)])

    refusals = []
    for rpc in ("submit", "run"):
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await send_stream(rpc, "key-a", [header, *job.chunks()], harness)
        refusals.append((excinfo.value.code().name, excinfo.value.details() or ""))
    (outcome,) = await run_many(harness, [batch], bearer("key-a"))
    refusals.append((outcome.error_code, outcome.error_message))

    assert [code for code, _ in refusals] == ["INVALID_ARGUMENT"] * 3
    assert all("unknown workload 'os.system'" in message for _, message in refusals)
    assert len(await harness.tasks("key-a")) == before


async def test_hostile_requests_get_their_exact_status_and_lose_no_valid_task(
    harness: Harness,
) -> None:
    before = {key: len(await harness.tasks(key)) for key in TENANT_KEYS}
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(batch=batches)
    def send(batch: list[Case]) -> None:
        for case in batch:
            asyncio.run_coroutine_threadsafe(harness.check(case), loop).result(timeout=60)

    await asyncio.to_thread(send)  # the loop stays free to serve while Hypothesis draws

    for task_id, (key, job) in harness.pending.items():
        assert_echoed(*await harness.result(key, task_id), job)
    for key in TENANT_KEYS:
        states = Counter(t.state for t in await harness.tasks(key))
        assert sum(states.values()) == before[key] + harness.created[key]
        assert states[task_pb2.TASK_STATE_FAILED] == harness.failed[key]
    assert harness.hostile >= 1000, harness.sent
    assert len(harness.sent) >= 30, harness.sent
    assert not list(harness.spool_dir.rglob("*.part"))
    health = await harness.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

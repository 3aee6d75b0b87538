"""``Client.map`` / ``AsyncClient.map`` (the RunMany call) against a real broker and agent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import sqlalchemy as sa
import torch

from gpubroker.billing.models import tasks, usage
from gpubroker.client import AsyncClient, Client
from gpubroker.client.errors import InvalidArgumentError, TaskFailedError
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from tests.support.cluster import BrokerProcess, broker_with_agent
from tests.support.rpc import AUTH
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow  # end to end: real broker (and agent) processes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with broker_with_agent(tmp_path_factory.mktemp("map"), "map-agent", slots=4) as broker:
        yield broker


def _rows(broker: BrokerProcess) -> tuple[dict[str, str], list[str]]:
    engine = sa.create_engine(broker.database_url)
    with engine.connect() as conn:
        states = dict(conn.execute(sa.select(tasks.c.id, tasks.c.state)).all())
        billed = list(conn.execute(sa.select(usage.c.task_id)).scalars())
    engine.dispose()
    return states, billed


def test_map_returns_every_result_in_input_order_and_bills_each_task_once(
    cluster: BrokerProcess,
) -> None:
    items = [[torch.tensor([float(i)]), torch.tensor([0.5])] for i in range(500)]
    with Client(cluster.address, "key-a") as client:
        # A small window and batch force many round trips and out-of-order completions.
        results = list(client.map("add", items, window=37, batch=8))

    assert [r.output.item() for r in results] == [i + 0.5 for i in range(500)]
    states, billed = _rows(cluster)
    ids = {r.task_id for r in results}
    assert len(ids) == 500
    assert all(states[i] == "succeeded" for i in ids)
    assert sorted(i for i in billed if i in ids) == sorted(ids)


def test_delivered_map_results_are_deleted_from_the_broker_soon_after(
    cluster: BrokerProcess,
) -> None:
    items = [[torch.tensor([float(i)]), torch.tensor([0.5])] for i in range(50)]
    with Client(cluster.address, "key-a") as client:
        ids = [r.task_id for r in client.map("add", items)]

    def kept() -> int:
        engine = sa.create_engine(cluster.database_url)
        with engine.connect() as conn:
            query = sa.select(sa.func.count()).where(
                tasks.c.id.in_(ids),
                sa.or_(tasks.c.inline_outputs.is_not(None), tasks.c.outputs_expired_at.is_(None)),
            )
            count = int(conn.execute(query).scalar_one())
        engine.dispose()
        return count

    wait_until(lambda: kept() == 0, 10, "the delivered results to expire")


def test_map_keeps_numpy_in_numpy_out_and_fetches_large_outputs(
    cluster: BrokerProcess,
) -> None:
    big = np.ones((64, 1024), dtype=np.float32)  # 256 KiB out: too large to ride inline
    with Client(cluster.address, "key-a") as client:
        small = list(client.map("echo", [np.arange(3, dtype=np.int64)]))
        # repeat=... is not an echo parameter; matmul of a small input makes a large output
        large = list(client.map("matmul", [[big[:, :8].copy(), np.ones((8, 1024), np.float32)]]))

    assert isinstance(small[0].output, np.ndarray)
    assert small[0].output.tolist() == [0, 1, 2]
    assert large[0].output.shape == (64, 1024)
    assert float(large[0].output[0, 0]) == 8.0


def test_a_failing_task_is_in_its_place_between_the_results_around_it(
    cluster: BrokerProcess,
) -> None:
    items = [[torch.ones(2), torch.ones(2)], [torch.ones(2), torch.ones(3)], [torch.ones(1)] * 2]
    with Client(cluster.address, "key-a") as client:
        first, failed, last = client.map("add", items)

    assert first.output.tolist() == [2.0, 2.0] and last.output.tolist() == [2.0]
    assert isinstance(failed.error, (TaskFailedError, InvalidArgumentError)) and not failed.ok
    with pytest.raises(type(failed.error)):
        _ = failed.output


def test_a_map_with_failures_delivers_every_success_and_bills_exactly_those(
    cluster: BrokerProcess,
) -> None:
    items: list[object] = []
    for i in range(30):  # every third fails on the agent, one cannot even be encoded
        good = [torch.full((2,), float(i)), torch.ones(2)]
        items.append(good if i % 3 else [torch.ones(2), torch.ones(3)])
    items[10] = "not a tensor"
    with Client(cluster.address, "key-c") as client:
        results = list(client.map("add", items, window=8, batch=4))  # type: ignore[arg-type]

    delivered = [r for r in results if r.ok]
    assert len(results) == 30 and len(delivered) == 19
    assert [r.output[0].item() for r in delivered] == [
        i + 1.0 for i in range(30) if i % 3 and i != 10
    ]
    assert [r.ok for r in results] == [bool(i % 3) and i != 10 for i in range(30)]
    wait_until(lambda: _live(cluster, "tenant-c") == 0, 30, "the map's tasks final")
    assert sorted(_billed(cluster, "tenant-c")) == sorted(r.task_id for r in delivered)


def test_a_map_abandoned_early_bills_only_the_results_received(cluster: BrokerProcess) -> None:
    items = [[torch.full((1,), float(i))] for i in range(20)]
    received = []
    with Client(cluster.address, "key-d") as client:
        # A window of the agent's 4 slots: each wave of 4 finishes before the next is sent.
        for result in client.map("sleep", items, window=4, seconds=1.0):
            received.append(result)
            if len(received) == 4:
                # The next wave is stored and running before we quit. (Quitting while the
                # broker commits a RunMany task leaves that task uncancelled: a broker race,
                # in TaskBatch._submit, that this test does not cover.)
                wait_until(lambda: _live(cluster, "tenant-d") == 4, 30, "the next wave")
                break  # the generator is dropped here: the call is hung up

    wait_until(lambda: _live(cluster, "tenant-d") == 0, 30, "the abandoned tasks cancelled")
    assert [r.output.item() for r in received] == [0.0, 1.0, 2.0, 3.0]
    assert sorted(_billed(cluster, "tenant-d")) == sorted(r.task_id for r in received)
    states = _states(cluster, "tenant-d")
    assert {i for i, s in states.items() if s == "succeeded"} == {r.task_id for r in received}
    assert {s for i, s in states.items() if s != "succeeded"} <= {"cancelled"}


def test_a_bad_item_is_refused_alone_with_invalid_argument(cluster: BrokerProcess) -> None:
    channel = grpc.insecure_channel(cluster.address)
    stub = broker_pb2_grpc.BrokerStub(channel)
    good = _inline(0, torch.tensor([1.0]))
    wrong_size = _inline(1, torch.tensor([1.0]), data=b"\0" * 3)
    unknown = _inline(2, torch.tensor([1.0]), workload="no-such-workload")
    request = broker_pb2.RunManyRequest(tasks=[good, wrong_size, unknown])
    replies = list(stub.RunMany(iter([request]), metadata=AUTH))
    channel.close()

    outcomes = {o.index: o for r in replies for o in r.outcomes}
    assert set(outcomes) == {0, 1, 2}
    assert outcomes[0].task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert outcomes[0].data_inline
    assert outcomes[1].error_code == "INVALID_ARGUMENT"
    assert outcomes[2].error_code == "INVALID_ARGUMENT"
    assert "no-such-workload" in outcomes[2].error_message


def test_map_without_a_key_is_unauthenticated(cluster: BrokerProcess) -> None:
    with Client(cluster.address) as client, pytest.raises(Exception) as info:
        list(client.map("echo", [torch.ones(1)]))
    assert "UNAUTHENTICATED" in repr(info.value) or "key" in str(info.value).lower()


async def test_leaving_a_map_early_cancels_the_tasks_still_live(cluster: BrokerProcess) -> None:
    items = [[torch.ones(1)] for _ in range(20)]
    async with AsyncClient(cluster.address, "key-a") as client:
        results = client.map("sleep", items, window=20, seconds=30.0)

        async def first_result() -> object:
            return await anext(results)

        first = asyncio.create_task(first_result())  # nothing finishes for 30 s
        await asyncio.to_thread(wait_until, lambda: _live(cluster) == 20, 30, "tasks queued")
        first.cancel()  # the caller gives up: the call is hung up
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await results.aclose()
    await asyncio.to_thread(wait_until, lambda: _live(cluster) == 0, 30, "live tasks cancelled")
    assert list(_states(cluster, "tenant-a").values()).count("cancelled") == 20


def _live(broker: BrokerProcess, tenant: str | None = None) -> int:
    engine = sa.create_engine(broker.database_url)
    query = sa.select(sa.func.count()).where(tasks.c.state.in_(("queued", "running")))
    if tenant is not None:
        query = query.where(tasks.c.tenant == tenant)
    with engine.connect() as conn:
        live = int(conn.execute(query).scalar_one())
    engine.dispose()
    return live


def _states(broker: BrokerProcess, tenant: str) -> dict[str, str]:
    engine = sa.create_engine(broker.database_url)
    query = sa.select(tasks.c.id, tasks.c.state).where(tasks.c.tenant == tenant)
    with engine.connect() as conn:
        states = {row.id: row.state for row in conn.execute(query)}
    engine.dispose()
    return states


def _billed(broker: BrokerProcess, tenant: str) -> list[str]:
    engine = sa.create_engine(broker.database_url)
    with engine.connect() as conn:
        billed = list(conn.execute(sa.select(usage.c.task_id).where(usage.c.tenant == tenant)))
    engine.dispose()
    return [row.task_id for row in billed]


async def test_async_map_matches_sync_map(cluster: BrokerProcess) -> None:
    items = [[torch.tensor([float(i)]), torch.tensor([2.0])] for i in range(100)]
    async with AsyncClient(cluster.address, "key-a") as client:
        results = [r async for r in client.map("add", items, window=16, batch=5)]
        first = await asyncio.wait_for(anext(aiter(client.map("echo", [torch.ones(2)]))), 30)
    assert [r.output.item() for r in results] == [i + 2.0 for i in range(100)]
    assert first.output.tolist() == [1.0, 1.0]


def _inline(
    index: int, tensor: torch.Tensor, *, data: bytes | None = None, workload: str = "echo"
) -> broker_pb2.InlineTask:
    from gpubroker.client.codec import encode
    from gpubroker.protos.convert import meta_to_proto

    meta, buffer = encode(tensor)
    header = broker_pb2.TaskHeader(workload=workload, inputs=[meta_to_proto(meta)])
    return broker_pb2.InlineTask(
        index=index, header=header, data=bytes(buffer) if data is None else data
    )

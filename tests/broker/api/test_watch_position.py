"""WatchTask reports a queued task's place in the queue as it moves, though the task itself
does not change: the watch looks again every ``POSITION_REFRESH_S``."""

from __future__ import annotations

import asyncio

import grpc

from gpubroker.protos import broker_pb2, broker_pb2_grpc
from tests.support.rpc import AUTH, submit


async def test_a_watch_of_a_queued_task_sees_its_place_move_up(
    broker_channel: grpc.aio.Channel,
) -> None:
    stub = broker_pb2_grpc.BrokerStub(broker_channel)
    first = await submit(broker_channel, b"first")  # no agent: both stay queued
    second = await submit(broker_channel, b"second")
    call = stub.WatchTask(broker_pb2.WatchTaskRequest(task_id=second), metadata=AUTH)
    try:
        opening = await asyncio.wait_for(call.read(), 10)
        assert isinstance(opening, broker_pb2.WatchTaskResponse)
        assert opening.task.queue_position == 2

        await stub.CancelTask(broker_pb2.CancelTaskRequest(task_id=first), metadata=AUTH)
        moved = await asyncio.wait_for(call.read(), 10)  # no event of its own: the refresh

        assert isinstance(moved, broker_pb2.WatchTaskResponse)
        assert moved.task.task_id == second
        assert moved.task.queue_position == 1
    finally:
        call.cancel()

"""The proto converters every end shares: task states and timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpubroker.protos import broker_pb2, task_pb2
from gpubroker.protos.convert import (
    state_from_proto,
    state_to_proto,
    time_from_proto,
    time_to_proto,
)
from gpubroker.protos.states import TaskState


@pytest.mark.parametrize("state", list(TaskState))
def test_every_task_state_survives_the_wire(state: TaskState) -> None:
    assert state_from_proto(state_to_proto(state)) is state


def test_an_unspecified_or_unknown_state_reads_as_none() -> None:
    assert state_from_proto(task_pb2.TASK_STATE_UNSPECIFIED) is None
    assert state_from_proto(99) is None


def test_a_timestamp_reads_back_as_the_same_aware_utc_datetime() -> None:
    when = datetime(2026, 12, 5, 9, 30, 1, 250_000, tzinfo=UTC)

    info = task_pb2.TaskInfo(created_at=time_to_proto(when))

    assert time_from_proto(info, "created_at") == when
    assert time_from_proto(info, "finished_at") is None


def test_a_naive_datetime_is_taken_as_utc() -> None:
    request = broker_pb2.GetUsageRequest(since=time_to_proto(datetime(2026, 1, 1)))

    assert time_from_proto(request, "since") == datetime(2026, 1, 1, tzinfo=UTC)
    assert time_to_proto(None) is None

"""The client's pure conversions: parameters, request streams, output kinds, task snapshots."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import timestamp_pb2

from gpubroker.client import (
    GpuRequirement,
    InternalError,
    TaskFailedError,
    TaskResult,
    TaskState,
)
from gpubroker.client._convert import (
    ResultCollector,
    TaskPager,
    encode_inputs,
    prepare_task,
    resolve_output,
    status_from_proto,
)
from gpubroker.client.codec import encode
from gpubroker.protos import broker_pb2, task_pb2
from gpubroker.protos.convert import meta_to_proto
from tests.support.chunks import iter_chunks


def _prepare(inputs: Any = (), **params: Any) -> Any:
    return prepare_task(
        "echo", inputs, params, priority=0, request_id=None, timeout=None, output=None
    )


def _info(state: int = task_pb2.TASK_STATE_SUCCEEDED, **fields: Any) -> task_pb2.TaskInfo:
    return task_pb2.TaskInfo(task_id="t1", state=state, **fields)  # type: ignore[arg-type]


# -- parameters ---------------------------------------------------------------------------------


def test_each_parameter_type_fills_its_own_field() -> None:
    params = _prepare(n=3, scale=0.5, mode="fast", flag=False).header.params

    assert params["n"].WhichOneof("kind") == "int_value" and params["n"].int_value == 3
    assert params["scale"].float_value == 0.5
    assert params["mode"].string_value == "fast"
    assert params["flag"].WhichOneof("kind") == "bool_value"


def test_a_bool_is_sent_as_a_bool_not_as_an_int() -> None:
    params = _prepare(yes=True, one=1).header.params

    assert params["yes"].WhichOneof("kind") == "bool_value"
    assert params["one"].WhichOneof("kind") == "int_value"


@pytest.mark.parametrize("value", [None, [1, 2], {"a": 1}, b"raw", 1j, np.int64(3)])
def test_a_parameter_of_another_type_is_a_type_error_naming_it(value: object) -> None:
    with pytest.raises(TypeError, match=r"parameter 'bad' is a .*; use int, float, str or bool"):
        _prepare(bad=value)


# -- inputs and the request stream ---------------------------------------------------------------


def test_a_single_tensor_and_a_list_of_one_encode_alike() -> None:
    tensor = torch.arange(6, dtype=torch.int16)

    single, list_of_one = encode_inputs(tensor), encode_inputs([tensor])

    assert single[0] == list_of_one[0] == [encode(tensor)[0]]
    assert single[1][0].tobytes() == tensor.numpy().tobytes()


@pytest.mark.parametrize("inputs", ["abc", b"abc", {"x": np.zeros(1)}, [1.0, 2.0]])
def test_inputs_that_are_not_tensors_are_a_type_error(inputs: Any) -> None:
    with pytest.raises(TypeError):
        encode_inputs(inputs)


def test_the_request_stream_is_one_header_then_chunks_spanning_the_inputs() -> None:
    a, b = np.arange(5, dtype=np.int8), np.arange(3, dtype=np.int16)
    task = _prepare([a, b], k=1)

    sent = list(task.requests(broker_pb2.SubmitRequest, chunk_bytes=4))
    # Chunk messages go out already serialised (protos.frames): any protobuf reader parses them.
    assert [type(m) for m in sent] == [broker_pb2.SubmitRequest, bytes, bytes, bytes]
    messages = [m if isinstance(m, broker_pb2.SubmitRequest) else _parse(m) for m in sent]

    assert [m.WhichOneof("kind") for m in messages] == ["header", "chunk", "chunk", "chunk"]
    header = messages[0].header
    assert header.workload == "echo" and [h.dtype for h in header.inputs] == ["int8", "int16"]
    assert [len(m.chunk.data) for m in messages[1:]] == [4, 4, 3]
    assert b"".join(m.chunk.data for m in messages[1:]) == a.tobytes() + b.tobytes()


def _parse(raw: bytes) -> broker_pb2.SubmitRequest:
    return broker_pb2.SubmitRequest.FromString(raw)


def test_each_retry_gets_a_fresh_request_stream_with_the_same_request_id() -> None:
    task = _prepare(np.ones(3))

    first = list(task.requests(broker_pb2.RunRequest, 1 << 20))
    second = list(task.requests(broker_pb2.RunRequest, 1 << 20))

    assert first == second and len(first) == 2
    assert len(task.header.request_id) == 32
    int(task.header.request_id, 16)


def test_a_task_of_empty_tensors_sends_only_its_header() -> None:
    task = _prepare([torch.empty(0, 3)])

    assert [m.WhichOneof("kind") for m in task.requests(broker_pb2.RunRequest, 8)] == ["header"]


def test_the_header_carries_priority_request_id_and_timeout() -> None:
    task = prepare_task("fft", [], {}, priority=7, request_id="abc", timeout=2.5, output=None)

    assert (task.header.priority, task.header.request_id) == (7, "abc")
    assert task.header.timeout_seconds == 2.5
    assert _prepare().header.timeout_seconds == 0.0


# -- output kinds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "asked", "expected"),
    [
        ([np.zeros(1)], None, "numpy"),
        ([np.zeros(1), np.ones(2)], None, "numpy"),
        ([np.zeros(1), torch.zeros(1)], None, "torch"),
        ([torch.zeros(1)], None, "torch"),
        ([], None, "torch"),
        ([np.zeros(1)], "torch", "torch"),
        ([torch.zeros(1)], "numpy", "numpy"),
    ],
)
def test_results_come_back_as_numpy_only_when_asked_or_when_every_input_was_numpy(
    inputs: list[Any], asked: Any, expected: str
) -> None:
    task = prepare_task("echo", inputs, {}, priority=0, request_id=None, timeout=None, output=asked)

    assert task.output == expected


def test_an_unknown_output_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="output must be"):
        resolve_output("jax", all_numpy=False)  # type: ignore[arg-type]


# -- task snapshots ------------------------------------------------------------------------------


def test_a_task_info_becomes_a_status_with_aware_datetimes() -> None:
    created = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(created)
    meta = encode(torch.ones(2, 2))[0]
    info = _info(
        tenant="acme",
        workload="matmul",
        attempt=2,
        priority=-3,
        request_id="r",
        created_at=stamp,
        compute_seconds=1.25,
        gpu_type="nvidia-l4",
        inputs=[meta_to_proto(meta)],
        outputs=[meta_to_proto(meta)],
    )

    status = status_from_proto(info)

    assert status.state is TaskState.SUCCEEDED and status.state.is_final
    assert (status.tenant, status.workload, status.attempt, status.priority) == (
        "acme",
        "matmul",
        2,
        -3,
    )
    assert status.created_at == created and status.created_at.utcoffset() == timedelta(0)
    assert status.started_at is None and status.finished_at is None and status.deadline is None
    assert status.inputs == status.outputs == (meta,)
    assert (status.compute_seconds, status.gpu_type) == (1.25, "nvidia-l4")


def test_a_model_tasks_snapshot_carries_its_load_time_batch_and_requirement() -> None:
    model_id = "c0" * 32
    info = _info(
        workload=f"model:{model_id}",
        model_load_seconds=0.75,
        batch_tasks=6,
        requires=task_pb2.GpuRequirement(gpu_type="nvidia-l4", min_memory_bytes=2**34),
    )

    status = status_from_proto(info)

    assert status.model_id == model_id
    assert (status.model_load_seconds, status.batch_tasks) == (0.75, 6)
    assert status.requires == GpuRequirement("nvidia-l4", 2**34)
    assert str(status.requires) == "nvidia-l4 with at least 16.0 GiB"


def test_an_operator_tasks_snapshot_has_no_model_and_no_requirement() -> None:
    status = status_from_proto(
        _info(task_pb2.TASK_STATE_QUEUED, workload="matmul", waiting_for="waiting for a VM")
    )

    assert status.model_id is None
    assert not status.requires and status.requires == GpuRequirement(None, 0)
    assert (status.model_load_seconds, status.batch_tasks) == (0.0, 0)
    assert status.waiting_for == "waiting for a VM"


@pytest.mark.parametrize(
    ("proto_state", "state", "final"),
    [
        (task_pb2.TASK_STATE_QUEUED, TaskState.QUEUED, False),
        (task_pb2.TASK_STATE_RUNNING, TaskState.RUNNING, False),
        (task_pb2.TASK_STATE_SUCCEEDED, TaskState.SUCCEEDED, True),
        (task_pb2.TASK_STATE_FAILED, TaskState.FAILED, True),
        (task_pb2.TASK_STATE_CANCELLED, TaskState.CANCELLED, True),
    ],
)
def test_every_proto_state_maps_to_a_task_state(
    proto_state: int, state: TaskState, final: bool
) -> None:
    assert status_from_proto(_info(proto_state)).state is state
    assert state.is_final is final
    assert state.value == state.name.lower()


# -- listing -------------------------------------------------------------------------------------


def _page(ids: list[str], token: str = "") -> broker_pb2.ListTasksResponse:
    tasks = [task_pb2.TaskInfo(task_id=i, state=task_pb2.TASK_STATE_QUEUED) for i in ids]
    return broker_pb2.ListTasksResponse(tasks=tasks, next_page_token=token)


def test_the_pager_follows_tokens_until_the_last_page() -> None:
    pager = TaskPager([TaskState.QUEUED, TaskState.RUNNING], limit=10)

    first = pager.next_request()
    assert first is not None
    pager.add(_page(["a", "b"], token="p2"))
    second = pager.next_request()
    assert second is not None
    pager.add(_page(["c"]))

    assert list(first.states) == [task_pb2.TASK_STATE_QUEUED, task_pb2.TASK_STATE_RUNNING]
    assert (first.page_size, first.page_token) == (10, "")
    assert (second.page_size, second.page_token) == (8, "p2")
    assert pager.next_request() is None
    assert [t.task_id for t in pager.tasks] == ["a", "b", "c"]


def test_the_pager_stops_at_the_limit_and_asks_for_at_most_a_thousand() -> None:
    pager = TaskPager(None, limit=2500)
    request = pager.next_request()
    assert request is not None and request.page_size == 1000

    small = TaskPager(None, limit=2)
    small.add(_page(["a", "b", "c"], token="more"))

    assert [t.task_id for t in small.tasks] == ["a", "b"]
    assert small.next_request() is None
    assert TaskPager(None, limit=0).next_request() is None


# -- results -------------------------------------------------------------------------------------


def _result_stream(values: list[Any], chunk_bytes: int = 3) -> list[broker_pb2.GetResultResponse]:
    metas, buffers, _ = encode_inputs(values)
    info = _info(outputs=[meta_to_proto(m) for m in metas])
    chunks = [task_pb2.DataChunk(data=c) for c in iter_chunks(buffers, chunk_bytes)]
    return [
        broker_pb2.GetResultResponse(header=info),
        *(broker_pb2.GetResultResponse(chunk=c) for c in chunks),
    ]


def test_the_collector_reassembles_outputs_of_the_asked_kind() -> None:
    values = [np.arange(7, dtype=np.float32), np.array(True)]
    collector = ResultCollector("numpy")

    for message in _result_stream(values):
        collector.add(message)
    result = collector.result()

    assert result.task_id == "t1" and len(result.outputs) == 2
    for sent, got in zip(values, result.outputs, strict=True):
        assert isinstance(got, np.ndarray) and got.dtype == sent.dtype
        np.testing.assert_array_equal(got, sent)


def test_bfloat16_comes_back_as_torch_even_when_numpy_is_asked() -> None:
    value = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    collector = ResultCollector("numpy")

    for message in _result_stream([value]):
        collector.add(message)

    assert torch.equal(collector.result().output, value)


def test_bytes_before_the_header_are_an_internal_error() -> None:
    collector = ResultCollector("torch")

    with pytest.raises(InternalError, match="before the result header"):
        collector.add(broker_pb2.RunResponse(chunk=task_pb2.DataChunk(data=b"x")))


def test_a_stream_that_ends_without_a_result_is_an_internal_error() -> None:
    collector = ResultCollector("torch")
    collector.add(broker_pb2.RunResponse(task=_info(task_pb2.TASK_STATE_QUEUED)))

    with pytest.raises(InternalError, match="without a result"):
        collector.result()


def test_a_stream_that_ends_on_a_failed_task_raises_the_tasks_own_error() -> None:
    collector = ResultCollector("torch")
    failed = _info(task_pb2.TASK_STATE_FAILED, error_code="ABORTED", error_message="boom")
    collector.add(broker_pb2.RunResponse(task=failed))

    with pytest.raises(TaskFailedError, match="boom"):
        collector.result()


def test_a_result_with_several_outputs_has_no_single_output() -> None:
    status = status_from_proto(_info())
    result = TaskResult(task_id="t1", outputs=(np.zeros(1), np.ones(1)), status=status)

    with pytest.raises(ValueError, match="has 2 outputs"):
        _ = result.output
    assert result.compute_seconds == status.compute_seconds and result.attempt == status.attempt

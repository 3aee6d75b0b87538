"""The real agent running users' models for a fake gateway over gRPC: fetch, cache, batch, fail."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from gpubroker.gpu_agent.model_loader import load_model
from gpubroker.gpu_agent.workloads import Param, WorkloadContext
from gpubroker.protos import agent_pb2
from gpubroker.protos.modelfile import workload_for
from gpubroker.protos.states import FailureCode
from tests.fakes.gateway import (
    AgentFactory,
    Upload,
    make_assignment,
    next_message,
    next_upload,
    outputs,
)
from tests.gpu_agent.conftest import ModelGateway
from tests.gpu_agent.models import FEATURES, model_file, model_id
from tests.support.waiting import wait_for


def _submit(
    gateway: ModelGateway,
    task_id: str,
    name: str,
    x: torch.Tensor,
    max_batch: int = 1,
    delay_s: float = 0.0,
    served: bytes | None = None,
) -> None:
    data = model_file(name)
    gateway.models[model_id(name)] = data if served is None else served
    assignment, inputs = make_assignment(task_id, workload_for(model_id(name)), [x])
    assignment.model.CopyFrom(
        agent_pb2.ModelRef(
            model_id=model_id(name),
            size_bytes=len(data),
            max_batch_size=max_batch,
            max_queue_delay_seconds=delay_s,
        )
    )
    gateway.submit(assignment, inputs)


async def _uploads(gateway: ModelGateway, count: int) -> dict[str, Upload]:
    got = [await next_upload(gateway) for _ in range(count)]
    return {u.header.attempt.task_id: u for u in got}


async def test_a_model_is_fetched_once_and_its_load_is_reported_apart_from_compute(
    model_gateway: ModelGateway, start_agent: AgentFactory
) -> None:
    agent = start_agent(slots=1)
    x = torch.randn(3, 8)
    expected = load_model(model_file("mlp"))(x)

    _submit(model_gateway, "first", "mlp", x)
    first = await next_upload(model_gateway)
    _submit(model_gateway, "second", "mlp", x)
    second = await next_upload(model_gateway)

    assert model_gateway.model_fetches == [model_id("mlp")] and agent.models.fetches == 1
    for upload in (first, second):
        assert upload.header.error_code == ""
        assert upload.header.batch_tasks == 1
        assert upload.header.compute_seconds > 0
        torch.testing.assert_close(outputs(upload), list(expected))
    assert first.header.model_load_seconds > first.header.compute_seconds
    assert second.header.model_load_seconds == 0.0


async def test_hello_and_heartbeats_list_the_models_held(
    model_gateway: ModelGateway, start_agent: AgentFactory, model_dir: Path
) -> None:
    model_dir.mkdir()
    (model_dir / model_id("cnn")).write_bytes(model_file("cnn"))
    start_agent(slots=1)

    hello = (await next_message(model_gateway, "hello")).hello
    _submit(model_gateway, "t", "mlp", torch.randn(1, 8))
    await next_upload(model_gateway)

    assert hello.runs_models and list(hello.models) == [model_id("cnn")]
    while list((await next_message(model_gateway, "heartbeat")).heartbeat.models) != [
        model_id("mlp"),
        model_id("cnn"),
    ]:
        pass


async def test_a_bad_model_file_fails_its_task_as_invalid_and_the_agent_still_serves(
    model_gateway: ModelGateway, start_agent: AgentFactory
) -> None:
    start_agent(slots=1)
    data = model_file("mlp")
    flipped = data[:100] + bytes([data[100] ^ 1]) + data[101:]

    _submit(model_gateway, "corrupt", "mlp", torch.randn(1, 8), served=flipped)
    failed = await next_upload(model_gateway)
    _submit(model_gateway, "truncated", "mlp", torch.randn(1, 8), served=data[:-1])
    truncated = await next_upload(model_gateway)
    model_gateway.submit(*make_assignment("op", "add", [torch.ones(2), torch.ones(2)]))
    served = await next_upload(model_gateway)

    assert failed.header.error_code == FailureCode.INVALID_ARGUMENT.value
    assert "sha256" in failed.header.error_message
    assert truncated.header.error_code == FailureCode.INVALID_ARGUMENT.value
    assert "bytes" in truncated.header.error_message
    assert served.header.error_code == "" and torch.equal(outputs(served)[0], torch.full((2,), 2.0))


async def test_inputs_that_do_not_fit_the_model_are_invalid_argument(
    model_gateway: ModelGateway, start_agent: AgentFactory
) -> None:
    start_agent(slots=1)

    _submit(model_gateway, "wide", "mlp", torch.randn(1, 9))
    upload = await next_upload(model_gateway)

    assert upload.header.error_code == FailureCode.INVALID_ARGUMENT.value
    assert "shape [Nx8]" in upload.header.error_message


async def test_64_single_row_tasks_run_in_batches_with_the_unbatched_results(
    model_gateway: ModelGateway, start_agent: AgentFactory
) -> None:
    agent = start_agent(slots=2, prefetch=64)
    rows = [torch.randn(1, *FEATURES["cnn"]) for _ in range(64)]
    model = load_model(model_file("cnn"))
    expected = [model(row)[0] for row in rows]

    for index, row in enumerate(rows):
        _submit(model_gateway, f"t{index}", "cnn", row, max_batch=32, delay_s=1.0)
    uploads = await _uploads(model_gateway, 64)

    assert agent.models.fetches == 1
    assert agent.batcher.calls < 64
    assert max(u.header.batch_tasks for u in uploads.values()) > 1
    for index, want in enumerate(expected):
        header = uploads[f"t{index}"].header
        assert header.error_code == "" and header.compute_seconds > 0
        torch.testing.assert_close(outputs(uploads[f"t{index}"])[0], want, rtol=1e-5, atol=1e-6)


async def test_a_failing_model_call_names_the_graph_node(
    model_gateway: ModelGateway, start_agent: AgentFactory
) -> None:
    start_agent(slots=1)

    _submit(model_gateway, "oob", "embedding", torch.tensor([[1, 42]]))
    upload = await next_upload(model_gateway)

    assert upload.header.error_code == FailureCode.ABORTED.value
    message = upload.header.error_message
    assert message.startswith("IndexError: index out of range")
    assert "at graph node embedding (aten.embedding.default)" in message


def _divide(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    return [_inner_step(inputs[0])]


def _inner_step(x: torch.Tensor) -> torch.Tensor:
    raise ZeroDivisionError(f"cannot split {x.numel()} elements")


async def test_a_failing_operator_workload_reports_its_last_frames(
    model_gateway: ModelGateway, start_agent: AgentFactory
) -> None:
    start_agent(slots=1, extra={"divide": _divide})

    model_gateway.submit(*make_assignment("div", "divide", [torch.ones(3)]))
    upload = await next_upload(model_gateway)

    assert upload.header.error_code == FailureCode.ABORTED.value
    lines = upload.header.error_message.splitlines()
    assert lines[0] == "ZeroDivisionError: cannot split 3 elements"
    assert lines[1].startswith("  at test_model_tasks.py:") and lines[1].endswith("in _divide")
    assert lines[2].endswith("in _inner_step") and len(lines) == 3


async def test_a_cancelled_task_waiting_for_its_batch_reports_nothing(
    model_gateway: ModelGateway, start_agent: AgentFactory
) -> None:
    agent = start_agent(slots=1, prefetch=8)
    _submit(model_gateway, "warm", "mlp", torch.randn(1, 8))
    await next_upload(model_gateway)

    _submit(model_gateway, "gone", "mlp", torch.randn(1, 8), max_batch=4, delay_s=60)
    await wait_for(lambda: agent.batcher._pending, what="a waiting batch")
    model_gateway.cancel("gone", 1)
    await next_message(model_gateway, "released")
    for index in range(4):
        _submit(model_gateway, f"b{index}", "mlp", torch.randn(1, 8), max_batch=4, delay_s=60)
    uploads = await _uploads(model_gateway, 4)

    assert sorted(uploads) == ["b0", "b1", "b2", "b3"]
    assert all(u.header.batch_tasks == 4 for u in uploads.values())
    assert model_gateway.uploads.empty()

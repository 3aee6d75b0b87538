"""Users' models through ``Client`` and ``AsyncClient``: upload once, list, delete, run by handle.

Against the fake broker, which checks uploads with ``modelfile.parse`` and counts the model
bytes it receives, so "nothing was sent" is measured rather than assumed.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from gpubroker.client import (
    GpuRequirement,
    InvalidArgumentError,
    Model,
    ModelExportError,
    NotFoundError,
    ResourceExhaustedError,
    TensorSpec,
)
from gpubroker.client._models import ModelUpload
from gpubroker.client.export import export_model
from gpubroker.protos import broker_pb2, modelfile
from tests.fakes.broker import MODEL_LOAD_SECONDS, FakeBroker, run_map


class _Branchy(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


EXAMPLE = (torch.randn(4, 8),)


async def test_an_upload_sends_the_file_and_returns_the_model_as_held(
    client: Any, fake: FakeBroker
) -> None:
    data = export_model(_mlp(), EXAMPLE)

    model = await client.upload_model(_mlp(), EXAMPLE, gpu="nvidia-l4")

    assert model.model_id == modelfile.model_id(data)
    assert model.workload == f"model:{model.model_id}"
    assert model.size_bytes == len(data) == fake.model_bytes_received
    assert model.name == "Sequential"  # the module's class name when none is given
    assert model.inputs == (TensorSpec("float32", (4, 8)),)
    assert model.outputs == (TensorSpec("float32", (4, 4)),)
    assert (model.batch_dim_varies, model.max_batch_size, model.max_queue_delay) == (False, 0, 0)
    assert model.requires == GpuRequirement("nvidia-l4", 0)
    assert model.created_at is not None
    assert fake.model_rpcs == ["GetModel", "UploadModel"]


async def test_uploading_the_same_module_again_sends_no_model_bytes(
    client: Any, fake: FakeBroker
) -> None:
    first = await client.upload_model(_mlp(), EXAMPLE, name="mlp")
    sent = fake.model_bytes_received

    again = await client.upload_model(_mlp(), EXAMPLE, name="mlp")

    assert again == first
    assert fake.model_bytes_received == sent
    assert fake.model_rpcs == ["GetModel", "UploadModel", "GetModel"]


async def test_changed_options_go_as_a_header_alone(client: Any, fake: FakeBroker) -> None:
    first = await client.upload_model(_mlp(), EXAMPLE, batch_dim_varies=True, name="mlp")
    sent = fake.model_bytes_received

    updated = await client.upload_model(
        _mlp(),
        EXAMPLE,
        batch_dim_varies=True,
        max_batch_size=32,
        max_queue_delay=0.002,
        min_gpu_memory="16GiB",
    )

    assert fake.model_bytes_received == sent
    assert fake.model_rpcs == ["GetModel", "UploadModel", "GetModel", "UploadModel"]
    header = fake.model_headers[-1]
    assert (header.model_id, header.size_bytes) == (first.model_id, first.size_bytes)
    assert header.name == "mlp"  # name=None keeps the name the model is held under
    assert (updated.max_batch_size, updated.max_queue_delay) == (32, 0.002)
    assert updated.requires == GpuRequirement(None, 16 * 2**30)
    assert updated.inputs == (TensorSpec("float32", (None, 8)),)
    assert updated.created_at == first.created_at


async def test_batching_delay_defaults_to_five_milliseconds(client: Any) -> None:
    model = await client.upload_model(_mlp(), EXAMPLE, batch_dim_varies=True, max_batch_size=8)

    assert (model.max_batch_size, model.max_queue_delay) == (8, 0.005)


async def test_models_are_listed_newest_first_fetched_and_deleted(client: Any) -> None:
    older = await client.upload_model(_mlp(), EXAMPLE, name="older")
    newer = await client.upload_model(_mlp(), EXAMPLE, name="newer", batch_dim_varies=True)

    listed = await client.models()
    fetched = await client.model(older.model_id)
    deleted = await client.delete_model(newer)

    assert [m.name for m in listed] == ["newer", "older"]
    assert fetched == older
    assert deleted == newer
    assert await client.models() == [older]
    with pytest.raises(NotFoundError, match="no model"):
        await client.model(newer)
    with pytest.raises(NotFoundError):
        await client.delete_model(newer.model_id)


async def test_a_malformed_model_id_is_a_value_error_before_any_rpc(
    client: Any, fake: FakeBroker
) -> None:
    with pytest.raises(ValueError, match="not a model id"):
        await client.model("nope")

    assert fake.model_rpcs == []


async def test_run_submit_and_map_take_a_model_in_place_of_a_workload(
    client: Any, fake: FakeBroker
) -> None:
    model = await client.upload_model(_mlp(), EXAMPLE)
    x = torch.randn(4, 8)

    ran = await client.run(model, x)
    submitted = await (await client.submit(model, x)).result()
    mapped = await run_map(client, model, [x, x])

    assert [h.workload for h in fake.headers] == [model.workload] * 4
    for result in (ran, submitted, *mapped):
        assert torch.equal(result.output, x)  # the fake echoes
        assert result.status.model_id == model.model_id
        assert result.model_load_seconds == MODEL_LOAD_SECONDS
        assert result.batch_tasks == 1


async def test_a_task_on_an_unknown_model_is_not_found(client: Any, fake: FakeBroker) -> None:
    model = await client.upload_model(_mlp(), EXAMPLE)
    await client.delete_model(model)

    with pytest.raises(NotFoundError, match=model.model_id):
        await client.run(model, torch.ones(4, 8))
    with pytest.raises(NotFoundError):
        await client.submit(model.workload, torch.ones(4, 8))
    with pytest.raises(NotFoundError):
        await run_map(client, model, [torch.ones(4, 8)], raise_on_error=True)


async def test_a_module_export_cannot_capture_fails_before_any_rpc(
    client: Any, fake: FakeBroker
) -> None:
    with pytest.raises(ModelExportError, match=r"torch\.export could not capture") as caught:
        await client.upload_model(_Branchy(), (torch.ones(3),))

    assert isinstance(caught.value, ValueError)
    assert fake.authorizations == []  # no call reached the broker


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch_size": 8}, "needs batch_dim_varies=True"),
        ({"max_batch_size": -1}, "max_batch_size must be"),
        ({"batch_dim_varies": True, "max_queue_delay": -0.1}, "max_queue_delay must be"),
        ({"min_gpu_memory": "lots"}, "cannot read 'lots' as a memory size"),
        ({"gpu": ""}, "gpu must be a GPU type"),
    ],
)
async def test_bad_upload_options_are_value_errors_before_any_rpc(
    client: Any, fake: FakeBroker, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await client.upload_model(_mlp(), EXAMPLE, **options)

    assert fake.authorizations == []


async def test_a_model_over_the_quota_is_resource_exhausted(client: Any, fake: FakeBroker) -> None:
    fake.model_quota_bytes = 1000

    with pytest.raises(ResourceExhaustedError, match="over the quota of 1000"):
        await client.upload_model(_mlp(), EXAMPLE)

    assert await client.models() == []


async def test_a_refused_model_is_invalid_argument(client: Any, fake: FakeBroker) -> None:
    fake.refuse_models = True

    with pytest.raises(InvalidArgumentError, match="from_file"):
        await client.upload_model(_mlp(), EXAMPLE)


def test_a_model_handle_is_a_plain_value() -> None:
    model = Model(
        model_id="ab" * 32,
        name="mlp",
        size_bytes=10,
        workload="model:" + "ab" * 32,
        inputs=(TensorSpec("float32", (None, 8)),),
        outputs=(TensorSpec("float32", (None, 4)),),
        batch_dim_varies=True,
        max_batch_size=8,
        max_queue_delay=0.005,
        requires=GpuRequirement("nvidia-l4", 0),
        created_at=None,
    )

    assert pickle.loads(pickle.dumps(model)) == model
    assert {model: 1}[dataclasses.replace(model)] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.name = "other"  # type: ignore[misc]


def _upload(data: bytes) -> ModelUpload:
    return ModelUpload(
        data=data,
        model_id=modelfile.model_id(data),
        name=None,
        default_name="Big",
        max_batch_size=0,
        max_queue_delay=0.0,
        requires=GpuRequirement(),
    )


def test_an_upload_stream_builds_its_chunks_one_at_a_time() -> None:
    upload = _upload(bytes(range(256)) * 41)  # 10,496 bytes: ten full chunks and a short one

    stream = upload.requests(None, chunk_bytes=1024)
    header = next(stream)
    first = next(stream)  # built on demand: the rest do not exist yet
    rest = list(stream)

    assert isinstance(header, broker_pb2.UploadModelRequest)
    assert (header.header.size_bytes, header.header.name) == (len(upload.data), "Big")
    messages = [m for m in [first, *rest] if isinstance(m, bytes)]  # framed without protobuf
    assert len(messages) == 1 + len(rest)
    chunks = [broker_pb2.UploadModelRequest.FromString(m).chunk.data for m in messages]
    assert [len(c) for c in chunks] == [1024] * 10 + [256]
    assert b"".join(chunks) == upload.data


def test_an_upload_of_a_held_model_is_its_header_alone() -> None:
    upload = _upload(b"model bytes")
    held = broker_pb2.ModelInfo(model_id=upload.model_id, name="kept")

    [message] = list(upload.requests(held, chunk_bytes=4))

    assert isinstance(message, broker_pb2.UploadModelRequest)
    assert message.header.name == "kept"
    assert not upload.is_held_as(broker_pb2.ModelInfo(name="kept", max_batch_size=4))
    assert upload.is_held_as(held)

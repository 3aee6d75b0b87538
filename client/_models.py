"""Users' models on the client: an upload prepared for sending, and ``Model`` handles.

Pure helpers shared by ``Client`` and ``AsyncClient``. An upload is exported and hashed once
(``prepare_upload``); then ``GetModel`` says what the broker already holds, and
``ModelUpload.plan`` decides what to send: nothing (held with the same options), the header
alone (held with other options), or the header and the file's bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpubroker.client._requirement import (
    requirement,
    requirement_from_proto,
    requirement_to_proto,
)
from gpubroker.client._types import GpuRequirement, Model, TensorSpec
from gpubroker.client.progress import ProgressCallback, counted_upload
from gpubroker.protos import broker_pb2, task_pb2
from gpubroker.protos.convert import time_from_proto
from gpubroker.protos.frames import chunk_messages
from gpubroker.protos.modelfile import is_model_id, model_id, model_of, workload_for

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_QUEUE_DELAY_S",
    "EXPORT_MAX_BATCH",
    "ModelUpload",
    "model_from_proto",
    "model_id_of",
    "prepare_upload",
    "workload_name",
]

DEFAULT_MAX_QUEUE_DELAY_S = 0.005
"""How long an agent holds a task of a batching model for others to stack with it, unless the
upload says otherwise. 5 ms is a few times a small model's own call time on a GPU, so a busy
model fills its batches, while a lone task waits far less than a ``run``'s round trip."""

EXPORT_MAX_BATCH = 1 << 16
"""The bound a varying batch dimension is exported with (``export.DEFAULT_MAX_BATCH``), so the
largest ``max_batch_size`` a model file allows; the broker may allow less."""


@dataclass(frozen=True, slots=True)
class ModelUpload:
    """An exported model file and the options to upload it with."""

    data: bytes
    """The model file."""
    model_id: str
    """Its sha256."""
    name: str | None
    """The name asked for; None keeps the held model's name, or takes ``default_name``."""
    default_name: str
    """The name of a new model uploaded without one: the module's class name."""
    max_batch_size: int
    max_queue_delay: float
    requires: GpuRequirement

    def header(self, held: broker_pb2.ModelInfo | None) -> broker_pb2.ModelHeader:
        """The upload's header, given what the broker holds under this id (if anything)."""
        name = self.name if self.name is not None else held.name if held else self.default_name
        return broker_pb2.ModelHeader(
            model_id=self.model_id,
            size_bytes=len(self.data),
            name=name,
            max_batch_size=self.max_batch_size,
            max_queue_delay_seconds=self.max_queue_delay,
            requires=requirement_to_proto(self.requires),
        )

    def is_held_as(self, held: broker_pb2.ModelInfo) -> bool:
        """True when ``held`` already has this upload's name and options: nothing to send."""
        header = self.header(held)
        return (
            held.name == header.name
            and held.max_batch_size == header.max_batch_size
            and math.isclose(
                held.max_queue_delay_seconds, header.max_queue_delay_seconds, abs_tol=1e-9
            )
            and requirement_from_proto(held.requires) == self.requires
        )

    def requests(
        self,
        held: broker_pb2.ModelInfo | None,
        chunk_bytes: int,
        progress: ProgressCallback | None = None,
    ) -> Iterator[broker_pb2.UploadModelRequest | bytes]:
        """The UploadModel stream: the header, then the file in chunks unless ``held``, the
        file's bytes reported to ``progress`` as they go.

        Chunk messages are built one at a time as gRPC asks for them (one copy of each chunk),
        so a large model is never held in memory twice.
        """
        yield broker_pb2.UploadModelRequest(header=self.header(held))
        if held is None:
            cls = broker_pb2.UploadModelRequest
            chunks = chunk_messages(cls, [self.data], chunk_bytes)
            yield from counted_upload(cls, chunks, len(self.data), progress)


def prepare_upload(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    name: str | None,
    batch_dim_varies: bool,
    max_batch_size: int,
    max_queue_delay: float,
    gpu: str | None,
    min_gpu_memory: int | str | None,
) -> ModelUpload:
    """Checks the options, exports the module and hashes the file: all before any RPC.

    Raises:
        ValueError: An option is out of range.
        ModelExportError: ``torch.export`` could not capture the module (export's own words).
    """
    _check_batching(batch_dim_varies, max_batch_size, max_queue_delay)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string, not {type(name).__name__}")
    requires = requirement(gpu, min_gpu_memory) or GpuRequirement()
    # Imported here: torch loads only for an upload, never with the client itself.
    from gpubroker.client.export import export_model

    data = export_model(
        module, example_inputs, batch_dim_varies=batch_dim_varies, max_batch=EXPORT_MAX_BATCH
    )
    batching = max_batch_size > 1
    return ModelUpload(
        data=data,
        model_id=model_id(data),
        name=name,
        default_name=type(module).__name__,
        max_batch_size=max_batch_size if batching else 0,
        max_queue_delay=float(max_queue_delay) if batching else 0.0,
        requires=requires,
    )


def _check_batching(batch_dim_varies: bool, max_batch_size: int, max_queue_delay: float) -> None:
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
        raise TypeError(f"max_batch_size must be an int, not {max_batch_size!r}")
    if not 0 <= max_batch_size <= EXPORT_MAX_BATCH:
        raise ValueError(f"max_batch_size must be 0..{EXPORT_MAX_BATCH}, got {max_batch_size}")
    if max_batch_size > 1 and not batch_dim_varies:
        raise ValueError(
            f"max_batch_size={max_batch_size} stacks tasks along the batch dimension, which "
            "needs batch_dim_varies=True"
        )
    if not (isinstance(max_queue_delay, int | float) and 0 <= max_queue_delay < math.inf):
        raise ValueError(f"max_queue_delay must be seconds >= 0, not {max_queue_delay!r}")


def model_from_proto(msg: broker_pb2.ModelInfo) -> Model:
    """Converts a model the broker holds into a handle."""
    return Model(
        model_id=msg.model_id,
        name=msg.name,
        size_bytes=msg.size_bytes,
        workload=msg.workload or workload_for(msg.model_id),
        inputs=tuple(_spec_from_proto(s) for s in msg.inputs),
        outputs=tuple(_spec_from_proto(s) for s in msg.outputs),
        batch_dim_varies=msg.batch_dim_varies,
        max_batch_size=msg.max_batch_size,
        max_queue_delay=msg.max_queue_delay_seconds,
        requires=requirement_from_proto(msg.requires),
        created_at=time_from_proto(msg, "created_at"),
    )


def _spec_from_proto(msg: task_pb2.TensorSpec) -> TensorSpec:
    return TensorSpec(msg.dtype, tuple(None if d < 0 else d for d in msg.shape))


def model_id_of(model: Model | str) -> str:
    """The id of a ``Model``, of a model id, or of a ``"model:<id>"`` workload name.

    Raises:
        ValueError: Not a model id (64 lowercase hex digits).
    """
    if isinstance(model, Model):
        return model.model_id
    if not isinstance(model, str):
        raise TypeError(f"expected a Model or a model id, not {type(model).__name__}")
    found = model_of(model) or model
    if not is_model_id(found):
        raise ValueError(f"{model!r} is not a model id (64 lowercase hex digits)")
    return found


def workload_name(workload: Any) -> str:
    """The workload a task names: a workload name as given, or a ``Model``'s workload."""
    if isinstance(workload, Model):
        return workload.workload
    if not isinstance(workload, str):
        raise TypeError(f"workload must be a name or a Model, not {type(workload).__name__}")
    return workload

"""The model calls of the blocking ``Client``: upload, read, list and delete users' models.

A mixin, so that ``_sync.py`` stays one concept per module; ``Client`` provides the channel's
stub, the upload stream, the call metadata and the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from gpubroker.client._models import (
    DEFAULT_MAX_QUEUE_DELAY_S,
    ModelUpload,
    model_from_proto,
    model_id_of,
    prepare_upload,
)
from gpubroker.client._types import Model
from gpubroker.client.errors import NotFoundError, translate_rpc_errors
from gpubroker.client.progress import Progress, ProgressCallback, progress_callback
from gpubroker.protos import broker_pb2, broker_pb2_grpc

if TYPE_CHECKING:
    import torch

__all__ = ["ModelCalls"]

_T = TypeVar("_T")


class ModelCalls:
    """``upload_model``, ``model``, ``models`` and ``delete_model`` for ``Client``."""

    _stub: broker_pb2_grpc.BrokerStub
    _upload: Callable[..., Any]
    _metadata: tuple[tuple[str, str], ...]
    _chunk_bytes: int
    model_bytes_sent: int

    def _unary(self, method: Callable[..., _T], request: Any) -> _T:
        with translate_rpc_errors():
            return method(request, metadata=self._metadata)

    def upload_model(
        self,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        name: str | None = None,
        batch_dim_varies: bool = False,
        max_batch_size: int = 0,
        max_queue_delay: float = DEFAULT_MAX_QUEUE_DELAY_S,
        gpu: str | None = None,
        min_gpu_memory: int | str | None = None,
        progress: Progress = None,
    ) -> Model:
        """Exports ``module`` on this machine and stores it with the broker, once.

        The module's forward, called on ``example_inputs``, is captured by ``torch.export``
        into a data-only model file (no pickles) whose id is its sha256. When you already hold
        that file, nothing is sent but the options, and only when they changed.

        Args:
            module: The ``torch.nn.Module`` to run remotely.
            example_inputs: Tensors to trace it with; their dtypes and shapes are what the
                model takes.
            name: What to list it under; None keeps the name of a model you already hold,
                else takes the module's class name.
            batch_dim_varies: The first dimension of every input and output may have any
                size (the example's must be at least 2).
            max_batch_size: Dynamic batching: stack up to this many rows of concurrent tasks
                into one call of the model (needs ``batch_dim_varies``); 0 or 1 is off.
            max_queue_delay: Dynamic batching: the longest, in seconds, an agent holds a task
                waiting for others to stack with it (5 ms by default).
            gpu: The GPU type the model's tasks need unless a task says otherwise.
            min_gpu_memory: Least device memory its tasks need: bytes, or ``"16GiB"``.
            progress: Reports the model file's upload: a callable ``(direction, done_bytes,
                total_bytes)``, or True for a bar (see ``gpubroker.client.progress``).

        Returns:
            The model as the broker holds it; pass it to ``run``, ``submit`` or ``map``.

        Raises:
            ModelExportError: ``torch.export`` could not capture the module (raised before
                anything is sent).
            ValueError: An option is out of range.
            InvalidArgumentError: The broker refused the model file.
            ResourceExhaustedError: The model does not fit in your model quota.
        """
        upload = prepare_upload(
            module,
            example_inputs,
            name=name,
            batch_dim_varies=batch_dim_varies,
            max_batch_size=max_batch_size,
            max_queue_delay=max_queue_delay,
            gpu=gpu,
            min_gpu_memory=min_gpu_memory,
        )
        return self._store_model(upload, progress_callback(progress))

    def model(self, model: Model | str) -> Model:
        """One of your models, by ``Model`` or id, as the broker holds it now.

        Raises:
            NotFoundError: You hold no model of that id.
        """
        return model_from_proto(self._held_model(model_id_of(model)))

    def models(self) -> list[Model]:
        """Your models, newest first."""
        reply = self._unary(self._stub.ListModels, broker_pb2.ListModelsRequest())
        return [model_from_proto(m) for m in reply.models]

    def delete_model(self, model: Model | str) -> Model:
        """Deletes one of your models (by ``Model`` or id); returns it as it was.

        Raises:
            NotFoundError: You hold no model of that id.
            FailedPreconditionError: Queued or running tasks still name it.
        """
        request = broker_pb2.DeleteModelRequest(model_id=model_id_of(model))
        return model_from_proto(self._unary(self._stub.DeleteModel, request).model)

    def _store_model(self, upload: ModelUpload, progress: ProgressCallback | None) -> Model:
        try:
            held: broker_pb2.ModelInfo | None = self._held_model(upload.model_id)
        except NotFoundError:
            held = None
        if held is not None and upload.is_held_as(held):
            return model_from_proto(held)
        requests = upload.requests(held, self._chunk_bytes, progress)
        with translate_rpc_errors():
            reply = self._upload(requests, metadata=self._metadata)
        if held is None:
            self.model_bytes_sent += len(upload.data)
        return model_from_proto(reply.model)

    def _held_model(self, model_id: str) -> broker_pb2.ModelInfo:
        request = broker_pb2.GetModelRequest(model_id=model_id)
        return self._unary(self._stub.GetModel, request).model

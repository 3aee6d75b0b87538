"""The model RPCs of the ``Broker`` service: decode, call ``ModelService``, encode.

A part of ``BrokerServicer`` (which inherits it), kept apart so that the task RPCs and the
model RPCs each stay one screenful. The caller's tenant comes from ``calling_tenant()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from gpubroker.broker.api.convert import (
    abort_on_broker_error,
    model_options_from_proto,
    model_to_proto,
    split_stream,
)
from gpubroker.broker.api.tenancy import calling_tenant
from gpubroker.broker.core.models import ModelService
from gpubroker.protos import broker_pb2

__all__ = ["ModelRpcs"]

Context = grpc.aio.ServicerContext[Any, Any]


class ModelRpcs:
    """``UploadModel``, ``GetModel``, ``ListModels`` and ``DeleteModel``."""

    _models: ModelService

    async def UploadModel(
        self, request_iterator: AsyncIterator[broker_pb2.UploadModelRequest], context: Context
    ) -> broker_pb2.UploadModelResponse:
        async with abort_on_broker_error(context, request_iterator):
            header, chunks = await split_stream(request_iterator)
            record, deduplicated = await self._models.upload(
                calling_tenant(),
                header.model_id,
                header.size_bytes,
                model_options_from_proto(header),
                chunks,
            )
        return broker_pb2.UploadModelResponse(
            model=model_to_proto(record), deduplicated=deduplicated
        )

    async def GetModel(
        self, request: broker_pb2.GetModelRequest, context: Context
    ) -> broker_pb2.GetModelResponse:
        async with abort_on_broker_error(context):
            record = self._models.get(calling_tenant(), request.model_id)
        return broker_pb2.GetModelResponse(model=model_to_proto(record))

    async def ListModels(
        self, request: broker_pb2.ListModelsRequest, context: Context
    ) -> broker_pb2.ListModelsResponse:
        records, total = self._models.list(calling_tenant())
        return broker_pb2.ListModelsResponse(
            models=[model_to_proto(r) for r in records],
            total_bytes=total,
            quota_bytes=self._models.limits.quota_bytes,
        )

    async def DeleteModel(
        self, request: broker_pb2.DeleteModelRequest, context: Context
    ) -> broker_pb2.DeleteModelResponse:
        async with abort_on_broker_error(context):
            record = await self._models.delete(calling_tenant(), request.model_id)
        return broker_pb2.DeleteModelResponse(model=model_to_proto(record))

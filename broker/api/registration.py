"""Registers a servicer with the chunk fast path of ``gpubroker.protos.frames`` on its data streams.

The generated ``add_*_to_server`` functions parse and build every message through protobuf. This
does the same from the service descriptor, with ``gpubroker.protos.frames`` (de)serializers: a
servicer receives a chunk as a ``memoryview`` of its data and may yield a chunk message as ``bytes``
built by ``gpubroker.protos.frames.chunk_message``. Messages without a ``DataChunk`` field keep
protobuf's own functions, so every other method behaves exactly as generated. Given an
``authenticate`` function, every method checks the caller's key first (see
``gpubroker.broker.api.tenancy``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from gpubroker.broker.api.tenancy import Authenticate, authenticated
from gpubroker.protos import frames

__all__ = ["add_servicer"]

_HANDLER: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: Any,
    authenticate: Authenticate | None = None,
) -> None:
    """Serves every method of ``service`` from the servicer's method of the same name, each
    behind ``authenticate`` when one is given."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        streaming = (method.client_streaming, method.server_streaming)
        behavior = getattr(servicer, method.name)
        if authenticate is not None:
            behavior = authenticated(
                behavior,
                authenticate,
                client_streaming=method.client_streaming,
                server_streaming=method.server_streaming,
            )
        handlers[method.name] = _HANDLER[streaming](
            behavior,
            request_deserializer=frames.deserializer(request),
            response_serializer=frames.serializer(response),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)

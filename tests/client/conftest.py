"""Fixtures of the client tests: a fake broker on a loopback port and clients of both kinds.

Every test that takes ``client`` runs once per client: the blocking ``Client`` runs in a worker
thread (the fake serves on the test's event loop), behind the async client's surface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from gpubroker.client import AsyncClient, Client
from gpubroker.protos import broker_pb2_grpc
from tests.fakes.broker import KEY, FakeBroker, InThread


@pytest.fixture
async def broker() -> AsyncIterator[tuple[FakeBroker, str]]:
    """The fake broker and its loopback address."""
    fake = FakeBroker()
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(fake, server)
    port = server.add_insecure_port("localhost:0")
    await server.start()
    try:
        yield fake, f"localhost:{port}"
    finally:
        await server.stop(grace=None)


@pytest.fixture(params=["Client", "AsyncClient"])
async def connect(
    request: pytest.FixtureRequest, broker: tuple[FakeBroker, str]
) -> AsyncIterator[Callable[..., Any]]:
    """Opens clients of one flavour with a given API key (and options); all are closed
    afterwards."""
    opened: list[Client | AsyncClient] = []

    def open_client(api_key: str | None, **options: Any) -> Any:
        # A tiny chunk size makes every input span several chunks, and chunks span inputs.
        if request.param == "Client":
            opened.append(Client(broker[1], api_key, chunk_bytes=7, **options))
            return InThread(opened[-1])  # type: ignore[arg-type]
        opened.append(AsyncClient(broker[1], api_key, chunk_bytes=7, **options))
        return opened[-1]

    yield open_client
    for client in opened:
        if isinstance(client, AsyncClient):
            await client.close()
        else:
            client.close()


@pytest.fixture
def fake(broker: tuple[FakeBroker, str]) -> FakeBroker:
    """The fake broker, to inspect what it received."""
    return broker[0]


@pytest.fixture
def client(connect: Callable[..., Any]) -> Any:
    """A client of either kind with the key the fake accepts."""
    return connect(KEY)

"""A broker process driven by plain generated stubs, as another language's client would drive it:
chunked tasks through protobuf's own (de)serialisation, and chunks the fast path cannot read."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

from gpubroker.client.codec import decode, encode
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.convert import meta_from_proto, meta_to_proto
from gpubroker.protos.wire import Assembler
from tests.support.chunks import iter_chunks
from tests.support.cluster import BrokerProcess, broker_with_agent
from tests.support.rpc import AUTH

pytestmark = pytest.mark.slow  # end to end: real broker (and agent) processes


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with broker_with_agent(tmp_path_factory.mktemp("frames"), "agent-f") as process:
        yield process


def _plain_run(
    address: str, tensor: torch.Tensor, chunk: Callable[[bytes], task_pb2.DataChunk]
) -> torch.Tensor:
    """A Run through the generated stub with protobuf (de)serialisation on the client side."""
    meta, data = encode(tensor)
    header = broker_pb2.TaskHeader(workload="echo", inputs=[meta_to_proto(meta)])
    requests = [broker_pb2.RunRequest(header=header)]
    requests += [broker_pb2.RunRequest(chunk=chunk(c)) for c in iter_chunks([data], 300_000)]
    with grpc.insecure_channel(address) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        replies = list(stub.Run(iter(requests), metadata=AUTH, timeout=60))
    assert all(isinstance(r, broker_pb2.RunResponse) for r in replies)
    info = [r.task for r in replies if r.WhichOneof("kind") == "task"][-1]
    assert info.state == task_pb2.TASK_STATE_SUCCEEDED
    assembler = Assembler([meta_from_proto(m) for m in info.outputs])
    for reply in replies:
        if reply.WhichOneof("kind") == "chunk":
            assembler.feed(reply.chunk.data)
    (buffer,) = assembler.finish()
    result = decode(meta_from_proto(info.outputs[0]), buffer, "torch")
    assert isinstance(result, torch.Tensor)
    return result


def test_a_plain_protobuf_client_runs_a_chunked_task(broker: BrokerProcess) -> None:
    tensor = torch.randn(300_000)  # 1.2 MB: four input chunks, spooled, two result chunks

    result = _plain_run(broker.address, tensor, lambda c: task_pb2.DataChunk(data=c))

    assert torch.equal(result, tensor)


def _with_an_unknown_field(data: bytes) -> task_pb2.DataChunk:
    """Valid protobuf (field 3 is unknown and kept), but not the fast path's canonical form."""
    chunk = task_pb2.DataChunk()
    chunk.MergeFromString(task_pb2.DataChunk(data=data).SerializeToString() + b"\x18\x07")
    return chunk


def test_chunks_in_another_encoding_take_protobufs_path(broker: BrokerProcess) -> None:
    tensor = torch.randn(300_000)

    result = _plain_run(broker.address, tensor, _with_an_unknown_field)

    assert torch.equal(result, tensor)

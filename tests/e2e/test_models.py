"""Users' own models end to end: exported on the client, uploaded once, fetched once by a real
agent process, run (batched where asked) and equal to the same module run locally.

One broker process and one agent process serve the module. Exact equality is asserted where the
agent runs the same kernels on the same shapes as the local reference (a CPU agent, the batch the
reference used); a batched call stacks rows, which can change how a matmul is tiled, so batched
results are compared to float32 rounding (rtol 1e-5).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import grpc
import pytest
import torch
from torch import nn

from gpubroker.client import Client, InvalidArgumentError, NotFoundError
from gpubroker.client.export import export_model
from gpubroker.protos import broker_pb2, broker_pb2_grpc, modelfile, task_pb2
from gpubroker.protos.modelfile import model_id, workload_for
from tests.support.cluster import AgentProcess, BrokerProcess
from tests.support.rpc import bearer

pytestmark = pytest.mark.slow  # end to end: real broker and agent processes


def _mlp() -> nn.Module:
    torch.manual_seed(10)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 3)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).eval()


def _transformer() -> nn.Module:
    torch.manual_seed(12)
    return nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()


def _reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # With gradients on, TransformerEncoderLayer takes its plain path (the same ATen ops as the
    # exported graph); under no_grad it would take the fused fast path, whose rounding differs.
    with torch.enable_grad():
        out: torch.Tensor = module(x)
    return out.detach()


MODELS = {
    "mlp": (_mlp, (12,)),
    "cnn": (_cnn, (3, 8, 8)),
    "transformer": (_transformer, (5, 16)),
}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[BrokerProcess, AgentProcess]]:
    root = tmp_path_factory.mktemp("models")
    broker = BrokerProcess(root).start()
    agent = AgentProcess(root, broker.address, "model-agent", slots=1).start()
    try:
        with Client(broker.address, "key-a") as client:
            client.run("echo", [torch.zeros(1)], timeout=60)  # the agent is up and serving
        yield broker, agent
    finally:
        agent.stop()
        broker.stop()


@pytest.fixture
def client(cluster: tuple[BrokerProcess, AgentProcess]) -> Iterator[Client]:
    with Client(cluster[0].address, "key-a") as c:
        yield c


@pytest.mark.parametrize("name", MODELS)
def test_an_uploaded_model_runs_remotely_and_equals_local(client: Client, name: str) -> None:
    build, features = MODELS[name]
    module = build()
    x = torch.randn(4, *features)

    model = client.upload_model(module, (x,), name=name)
    first = client.run(model, [x], timeout=120)
    second = client.run(model, [x], timeout=120)

    expected = _reference(module, x)
    assert torch.equal(first.output, expected)
    assert torch.equal(second.output, expected)
    # The first run paid the fetch and load, apart from its bill; the second found it resident.
    assert first.model_load_seconds > 0
    assert second.model_load_seconds == 0
    assert first.compute_seconds > 0


def test_the_agent_fetches_a_model_once_however_often_it_runs(
    client: Client, cluster: tuple[BrokerProcess, AgentProcess]
) -> None:
    module = _mlp()
    x = torch.randn(2, 12)
    model = client.upload_model(module, (x,), name="fetched-once")

    results = [client.run(model, [x], timeout=120) for _ in range(5)]

    assert all(torch.equal(r.output, _reference(module, x)) for r in results)
    assert sum(r.model_load_seconds > 0 for r in results) == 1
    assert cluster[1].log().count(f"fetched model {model.model_id}") == 1


def test_a_second_upload_of_the_same_module_sends_no_bytes(client: Client) -> None:
    module = _cnn()
    x = torch.randn(2, 3, 8, 8)

    first = client.upload_model(module, (x,), name="twice")
    sent = client.model_bytes_sent
    second = client.upload_model(module, (x,), name="twice")

    assert second == first
    assert client.model_bytes_sent == sent >= first.size_bytes > 0
    assert [m.model_id for m in client.models()].count(first.model_id) == 1


def test_batched_requests_run_as_fewer_calls_with_shares_that_add_up(client: Client) -> None:
    module = _mlp()
    model = client.upload_model(
        module,
        (torch.randn(4, 12),),
        name="batched",
        batch_dim_varies=True,
        max_batch_size=16,
        max_queue_delay=0.05,
    )
    rows = [torch.randn(1, 12) for _ in range(64)]
    client.run(model, [rows[0]], timeout=120)  # fetched and resident before the burst

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: client.run(model, [r], timeout=120), rows))

    for row, result in zip(rows, results, strict=True):
        torch.testing.assert_close(result.output, _reference(module, row), rtol=1e-5, atol=1e-6)
    assert max(r.batch_tasks for r in results) > 1
    assert all(r.compute_seconds > 0 for r in results)


def test_tenants_cannot_see_or_use_each_others_models(
    client: Client, cluster: tuple[BrokerProcess, AgentProcess]
) -> None:
    model = client.upload_model(_mlp(), (torch.randn(2, 12),), name="private")

    with Client(cluster[0].address, "key-b") as other:
        with pytest.raises(NotFoundError):
            other.run(model, [torch.randn(2, 12)], timeout=60)
        with pytest.raises(NotFoundError):
            other.delete_model(model)
        assert model.model_id not in {m.model_id for m in other.models()}
    assert model.model_id in {m.model_id for m in client.models()}


def test_wrong_inputs_for_a_model_are_refused_at_submit(client: Client) -> None:
    model = client.upload_model(_mlp(), (torch.randn(2, 12),), name="strict")

    with pytest.raises(InvalidArgumentError):
        client.run(model, [torch.randn(2, 13)], timeout=60)


def test_a_failure_inside_a_model_names_the_exception_and_node(client: Client) -> None:
    class Gather(nn.Module):
        def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return torch.gather(x, 1, index)

    x, index = torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.int64)
    model = client.upload_model(Gather(), (x, index), name="gather")

    with pytest.raises(Exception) as caught:
        client.run(model, [x, torch.full((2, 1), 99, dtype=torch.int64)], timeout=60)

    text = str(caught.value)
    assert "RuntimeError" in text or "IndexError" in text
    assert "gather" in text
    # ...and the agent still serves.
    assert torch.equal(client.run(model, [x, index], timeout=60).output, torch.gather(x, 1, index))


def test_a_graph_the_agent_refuses_fails_its_task_and_the_agent_keeps_serving(
    client: Client, cluster: tuple[BrokerProcess, AgentProcess]
) -> None:
    # An ATen name torch does not know passes the broker's torch-free check (the namespace is
    # allowed) and is refused by the agent's, before torch rebuilds anything from the graph.
    real = modelfile.parse(export_model(_mlp(), (torch.randn(2, 12),)))
    graph = real.graph.replace(
        b"torch.ops.aten.linear.default", b"torch.ops.aten.no_such_op.default"
    )
    assert graph != real.graph
    data = modelfile.pack(real.metadata, graph, real.weights)
    header = broker_pb2.ModelHeader(model_id=model_id(data), size_bytes=len(data), name="odd")
    requests = [
        broker_pb2.UploadModelRequest(header=header),
        broker_pb2.UploadModelRequest(chunk=task_pb2.DataChunk(data=data)),
    ]
    with grpc.insecure_channel(cluster[0].address) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        stub.UploadModel(iter(requests), metadata=bearer("key-a"), timeout=30)

    with pytest.raises(InvalidArgumentError, match="no_such_op"):
        client.run(workload_for(model_id(data)), [torch.randn(2, 12)], timeout=60)

    assert cluster[1].alive
    assert torch.equal(
        client.run("add", [torch.ones(2), torch.ones(2)]).output, torch.full((2,), 2.0)
    )

"""Malformed client streams get a clear error and the right status code, and lose nothing.

The broker runs as a real process with small size limits; each bad stream is sent through
the raw generated stub, then a good task proves the broker still serves and nothing leaked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from gpubroker.client import Client
from gpubroker.client.codec import encode
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from tests.support.chunks import iter_chunks
from tests.support.cluster import BrokerProcess, broker_with_agent
from tests.support.rpc import AUTH, bearer, submit_requests

pytestmark = pytest.mark.slow  # end to end: real broker (and agent) processes

MAX_TENSOR_BYTES = 1 << 20


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    root = tmp_path_factory.mktemp("malformed")
    env = {
        "GPUBROKER_MAX_TENSOR_BYTES": str(MAX_TENSOR_BYTES),
        "GPUBROKER_MAX_TASK_BYTES": str(2 * MAX_TENSOR_BYTES),
    }
    with broker_with_agent(root, "agent-m", env=env) as process:
        with Client(process.address, "key-a") as client:
            client.run("echo", [torch.zeros(1)], timeout=60)
        yield process


@pytest.fixture
def stub(broker: BrokerProcess) -> Iterator[broker_pb2_grpc.BrokerStub]:
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(broker.address, options=options) as channel:
        yield broker_pb2_grpc.BrokerStub(channel)


def _header(tensor: torch.Tensor, **overrides: object) -> task_pb2.TensorHeader:
    meta, _ = encode(tensor)
    fields: dict[str, Any] = {
        "dtype": meta.dtype,
        "shape": list(meta.shape),
        "nbytes": meta.nbytes,
        "crc32c": meta.crc32c,
    }
    fields.update(overrides)
    return task_pb2.TensorHeader(**fields)


def _submit(
    stub: broker_pb2_grpc.BrokerStub,
    headers: list[task_pb2.TensorHeader],
    chunks: list[bytes],
    workload: str = "echo",
) -> broker_pb2.SubmitResponse:
    header = broker_pb2.TaskHeader(workload=workload, inputs=headers)
    return stub.Submit(iter(submit_requests(header, chunks)), metadata=AUTH, timeout=30)


def _bytes(tensor: torch.Tensor) -> list[bytes]:
    _, data = encode(tensor)
    return list(iter_chunks([data], 1 << 16))


def _task_count(stub: broker_pb2_grpc.BrokerStub) -> int:
    reply = stub.ListTasks(broker_pb2.ListTasksRequest(page_size=1000), metadata=AUTH, timeout=10)
    return len(reply.tasks)


TENSOR = torch.arange(1000, dtype=torch.float32)


def _case_wrong_nbytes(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR, nbytes=3999)], _bytes(TENSOR))


def _case_short_stream(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR)], [_bytes(TENSOR)[0][:100]])


def _case_extra_bytes(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR)], [*_bytes(TENSOR), b"extra"])


def _case_bad_checksum(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR, crc32c=12345)], _bytes(TENSOR))


def _case_flipped_byte(stub: broker_pb2_grpc.BrokerStub) -> None:
    data = bytearray(b"".join(_bytes(TENSOR)))
    data[17] ^= 0xFF
    _submit(stub, [_header(TENSOR)], [bytes(data)])


def _case_unknown_dtype(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR, dtype="float128")], _bytes(TENSOR))


def _case_negative_dim(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR, shape=[-1000])], _bytes(TENSOR))


def _case_unknown_workload(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR)], _bytes(TENSOR), workload="rm -rf /")


def _case_empty_workload(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR)], _bytes(TENSOR), workload="")


def _case_missing_header(stub: broker_pb2_grpc.BrokerStub) -> None:
    stub.Submit(
        iter([broker_pb2.SubmitRequest(chunk=task_pb2.DataChunk(data=b"x"))]),
        metadata=AUTH,
        timeout=30,
    )


def _case_empty_stream(stub: broker_pb2_grpc.BrokerStub) -> None:
    stub.Submit(iter([]), metadata=AUTH, timeout=30)


def _case_second_header(stub: broker_pb2_grpc.BrokerStub) -> None:
    header = broker_pb2.SubmitRequest(header=broker_pb2.TaskHeader(workload="echo"))
    stub.Submit(iter([header, header]), metadata=AUTH, timeout=30)


def _case_oversize_tensor(stub: broker_pb2_grpc.BrokerStub) -> None:
    big = torch.zeros(MAX_TENSOR_BYTES // 4 + 1)
    _submit(stub, [_header(big)], _bytes(big))


def _case_oversize_task(stub: broker_pb2_grpc.BrokerStub) -> None:
    part = torch.zeros(MAX_TENSOR_BYTES // 4)
    _submit(stub, [_header(part)] * 3, _bytes(part) * 3)


def _case_oversize_message(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR)], [b"\0" * (20 << 20)])


def _case_huge_declared_shape(stub: broker_pb2_grpc.BrokerStub) -> None:
    _submit(stub, [_header(TENSOR, shape=[1 << 40, 1 << 20], nbytes=(1 << 62))], [])


def _case_bad_priority(stub: broker_pb2_grpc.BrokerStub) -> None:
    header = broker_pb2.TaskHeader(workload="echo", priority=10_000)
    stub.Submit(iter([broker_pb2.SubmitRequest(header=header)]), metadata=AUTH, timeout=30)


def _case_bad_api_key(stub: broker_pb2_grpc.BrokerStub) -> None:
    header = broker_pb2.SubmitRequest(header=broker_pb2.TaskHeader(workload="echo"))
    stub.Submit(iter([header]), metadata=bearer("nope"), timeout=30)


def _case_no_api_key(stub: broker_pb2_grpc.BrokerStub) -> None:
    header = broker_pb2.SubmitRequest(header=broker_pb2.TaskHeader(workload="echo"))
    stub.Submit(iter([header]), timeout=30)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
CASES = [
    (_case_wrong_nbytes, INVALID, "nbytes"),
    (_case_short_stream, INVALID, "ended after"),
    (_case_extra_bytes, INVALID, "more bytes"),
    (_case_bad_checksum, INVALID, "crc32c"),
    (_case_flipped_byte, INVALID, "crc32c"),
    (_case_unknown_dtype, INVALID, "unknown dtype"),
    (_case_negative_dim, INVALID, "negative"),
    (_case_unknown_workload, INVALID, "unknown workload"),
    (_case_empty_workload, INVALID, "no workload"),
    (_case_missing_header, INVALID, "header"),
    (_case_empty_stream, INVALID, "header"),
    (_case_second_header, INVALID, "chunk"),
    (_case_oversize_tensor, TOO_BIG, "exceeds the limit"),
    (_case_oversize_task, TOO_BIG, "exceed the limit"),
    (_case_oversize_message, TOO_BIG, ""),
    (_case_huge_declared_shape, TOO_BIG, "exceeds the limit"),
    (_case_bad_priority, INVALID, "priority"),
    (_case_bad_api_key, grpc.StatusCode.UNAUTHENTICATED, "API key"),
    (_case_no_api_key, grpc.StatusCode.UNAUTHENTICATED, "API key"),
]


@pytest.mark.parametrize(("case", "code", "message"), CASES, ids=[c[0].__name__[6:] for c in CASES])
def test_a_malformed_submit_is_refused_and_the_broker_keeps_serving(
    stub: broker_pb2_grpc.BrokerStub,
    broker: BrokerProcess,
    case: object,
    code: grpc.StatusCode,
    message: str,
) -> None:
    before = _task_count(stub)
    assert callable(case)

    with pytest.raises(grpc.RpcError) as excinfo:
        case(stub)

    error = excinfo.value
    assert error.code() == code, error.details()
    assert message.lower() in (error.details() or "").lower()
    assert _task_count(stub) == before
    with Client(broker.address, "key-a") as client:
        assert torch.equal(client.run("echo", [TENSOR], timeout=60).output, TENSOR)
    assert _task_count(stub) == before + 1
    assert not list((broker.root / "spool" / "in").glob("*.part"))


def test_an_unknown_task_id_is_not_found(stub: broker_pb2_grpc.BrokerStub) -> None:
    with pytest.raises(grpc.RpcError) as get_error:
        stub.GetTask(broker_pb2.GetTaskRequest(task_id="nope"), metadata=AUTH, timeout=10)
    with pytest.raises(grpc.RpcError) as cancel_error:
        stub.CancelTask(broker_pb2.CancelTaskRequest(task_id="nope"), metadata=AUTH, timeout=10)

    assert get_error.value.code() == grpc.StatusCode.NOT_FOUND
    assert cancel_error.value.code() == grpc.StatusCode.NOT_FOUND


def test_another_tenants_task_looks_like_it_does_not_exist(broker: BrokerProcess) -> None:
    with Client(broker.address, "key-a") as owner, Client(broker.address, "key-b") as other:
        handle = owner.submit("echo", [TENSOR])
        handle.result(timeout=60)

        from gpubroker.client import NotFoundError

        with pytest.raises(NotFoundError):
            other.task(handle.task_id).status()
        with pytest.raises(NotFoundError):
            other.task(handle.task_id).result(timeout=10)
        with pytest.raises(NotFoundError):
            other.task(handle.task_id).cancel()
        assert handle.task_id not in {t.task_id for t in other.list_tasks()}


async def test_the_async_client_always_gets_the_real_status_of_a_refused_stream(
    broker: BrokerProcess,
) -> None:
    from gpubroker.client import AsyncClient, AuthenticationError, InvalidArgumentError

    codes = set()
    for _ in range(20):  # the race this guards against lost the status about 1 time in 3
        async with (
            AsyncClient(broker.address, "wrong-key") as bad,
            AsyncClient(broker.address, "key-a") as good,
        ):
            for call in (bad.run("echo", [TENSOR]), good.run("no-such-workload", [TENSOR])):
                try:
                    await call
                except (AuthenticationError, InvalidArgumentError) as exc:
                    codes.add(type(exc).__name__)

    assert codes == {"AuthenticationError", "InvalidArgumentError"}

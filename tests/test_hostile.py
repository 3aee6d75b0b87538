"""Hostile input: over a thousand generated malformed or adversarial requests against one broker.

Hypothesis draws each case with the exact status code it must get: wrong sizes, huge declared
shapes, ranks and dimensions, bad dtypes, truncated or overlong streams, bad checksums, streams
out of order, bad API keys, other tenants' task ids, oversize messages, bad params, priorities
and timeouts, and ``RunMany`` batches whose bad items must be refused alone. Valid tasks are
interleaved throughout; at the end every one must have succeeded with its own output, no
refused request may have left a task behind, and the broker must still report SERVING.

The broker runs in the test's event loop and a real agent process runs the ``echo`` workload.
Hypothesis runs in a worker thread and hands each case to the loop, where it is sent through
the raw generated stubs on one channel.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import string
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gpubroker.broker.config import Limits
from gpubroker.broker.server import MAX_MESSAGE_BYTES, BrokerServer
from gpubroker.gpu_agent.workloads import registry
from gpubroker.protos import broker_pb2, broker_pb2_grpc, task_pb2
from gpubroker.protos.wire import DTYPE_ITEMSIZE, INLINE_MAX_BYTES, MAX_RANK, crc32c
from tests.cluster import AgentProcess, broker_settings, running_broker

pytestmark = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = 28
"""Batches drawn. A batch holds one case per unit of family weight (54), in random order, so
about 1,500 cases in all, four in five hostile. Batches rather than single cases because
Hypothesis picks among families far from evenly; this way each family gets its share."""

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
TENANT_KEYS = tuple(KEYS)
LIMITS = Limits(
    max_tensor_bytes=1 << 20,
    max_task_bytes=3 << 19,
    max_inputs=4,
    max_params=4,
    max_rank=6,
    max_dim=1 << 24,
    allowed_dtypes=frozenset(DTYPE_ITEMSIZE) - {"complex128"},
    max_timeout_s=3600.0,
)
DTYPES = sorted(LIMITS.allowed_dtypes)
KNOWN_WORKLOADS = frozenset(registry())
INT64_MAX = (1 << 63) - 1
INT32_MAX = (1 << 31) - 1

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS

Part = broker_pb2.TaskHeader | bytes | None
"""One message of a Submit or Run stream: a header, a chunk's bytes, or a message with neither."""


# -- what is sent ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """A tensor's raw bytes and what its header says about them."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def header(self, **overrides: Any) -> task_pb2.TensorHeader:
        fields: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        fields |= {"nbytes": len(self.data)}
        return task_pb2.TensorHeader(**(fields | {"crc32c": crc32c(self.data)} | overrides))


@dataclass(frozen=True)
class Job:
    """A valid echo task: inputs, scheduling fields and where its byte stream is cut."""

    inputs: tuple[Tensor, ...]
    priority: int
    timeout_s: float
    cuts: tuple[int, ...]

    @property
    def data(self) -> bytes:
        return b"".join(t.data for t in self.inputs)

    def header(
        self, inputs: Sequence[task_pb2.TensorHeader] | None = None, **fields: Any
    ) -> broker_pb2.TaskHeader:
        values: dict[str, Any] = {"workload": "echo", "priority": self.priority}
        values["timeout_seconds"] = self.timeout_s
        headers = [t.header() for t in self.inputs] if inputs is None else inputs
        return broker_pb2.TaskHeader(inputs=headers, **(values | fields))

    def chunks(self, data: bytes | None = None) -> list[bytes]:
        data = self.data if data is None else data
        edges = [0, *(min(c, len(data)) for c in self.cuts), len(data)]
        return [data[a:b] for a, b in itertools.pairwise(edges)]

    def parts(self, **fields: Any) -> list[Part]:
        return [self.header(**fields), *self.chunks()]


Send = Callable[["Harness"], Awaitable[None]]


@dataclass(frozen=True)
class Case:
    """One generated request and the status code it must end with."""

    family: str
    expected: grpc.StatusCode
    send: Send = field(repr=False)
    hostile: bool = True


# -- strategies --------------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn, dtypes: Sequence[str] = DTYPES, max_rank: int = 3) -> Tensor:
    """Small tensors of random bytes (bool: 0 or 1), empty and 0-d ones included."""
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=max_rank)))
    size = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    data = (
        bytes(rng.getrandbits(1) for _ in range(size)) if dtype == "bool" else rng.randbytes(size)
    )
    return Tensor(dtype, shape, data)


@st.composite
def jobs(draw: st.DrawFn, nonempty: bool = False) -> Job:
    """Valid echo tasks of one to three inputs, their bytes cut at random places."""
    inputs = tuple(draw(st.lists(tensors(), min_size=1, max_size=3)))
    if nonempty and not any(t.data for t in inputs):
        inputs += (Tensor("uint8", (3,), b"abc"),)
    total = sum(len(t.data) for t in inputs)
    cuts = tuple(sorted(draw(st.lists(st.integers(0, total), max_size=3))))
    # Valid tasks get a deadline far beyond this test, or none.
    timeout_s = draw(st.sampled_from([0.0, 600.0, 3600.0]))
    return Job(inputs, draw(st.integers(-100, 100)), timeout_s, cuts)


param_values = st.one_of(
    st.builds(task_pb2.ParamValue, int_value=st.integers(-(2**63), INT64_MAX)),
    st.builds(task_pb2.ParamValue, float_value=st.floats()),
    st.builds(task_pb2.ParamValue, string_value=st.text(max_size=20)),
    st.builds(task_pb2.ParamValue, bool_value=st.booleans()),
)
keys = st.sampled_from(TENANT_KEYS)
task_ids = st.text(max_size=40)
_bad_states = st.one_of(st.just(0), st.integers(6, INT32_MAX))
ID_RPCS = ("get", "cancel", "watch", "result")


def _stream(draw: st.DrawFn, family: str, code: grpc.StatusCode, parts: list[Part]) -> Case:
    rpc = draw(st.sampled_from(["submit", "run"]))
    return Case(family, code, partial(_send_stream, rpc, draw(keys), tuple(parts)))


def _with_input(job: Job, index: int, header: task_pb2.TensorHeader) -> list[task_pb2.TensorHeader]:
    headers = [t.header() for t in job.inputs]
    headers[index % len(headers)] = header
    return headers


@st.composite
def wrong_nbytes(draw: st.DrawFn) -> Case:
    job, i = draw(jobs()), draw(st.integers(0, 2))
    tensor = job.inputs[i % len(job.inputs)]
    delta = draw(st.integers(-(1 << 40), 1 << 40).filter(bool))
    headers = _with_input(job, i, tensor.header(nbytes=len(tensor.data) + delta))
    return _stream(draw, "wrong nbytes", INVALID, [job.header(headers), *job.chunks()])


@st.composite
def negative_dim(draw: st.DrawFn) -> Case:
    job = draw(jobs())
    tensor = draw(tensors(max_rank=4).filter(lambda t: t.shape))
    shape = list(tensor.shape)
    shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(-(2**63), -1))
    headers = _with_input(job, 0, tensor.header(shape=shape))
    return _stream(draw, "negative dimension", INVALID, [job.header(headers), *job.chunks()])


@st.composite
def rank_beyond_the_wire(draw: st.DrawFn) -> Case:
    shape = draw(st.lists(st.integers(0, 3), min_size=MAX_RANK + 1, max_size=2 * MAX_RANK))
    header = task_pb2.TensorHeader(dtype="uint8", shape=shape, nbytes=math.prod(shape))
    return _stream(draw, "rank beyond the wire format", INVALID, [draw(jobs()).header([header])])


@st.composite
def rank_over_limit(draw: st.DrawFn) -> Case:
    rank = draw(st.integers(LIMITS.max_rank + 1, MAX_RANK))
    tensor = Tensor("int16", (1,) * rank, draw(st.binary(min_size=2, max_size=2)))
    job = draw(jobs())
    return _stream(
        draw, "rank over max_rank", EXHAUSTED, [job.header([tensor.header()]), tensor.data]
    )


@st.composite
def huge_dim(draw: st.DrawFn) -> Case:
    dim = draw(st.integers(LIMITS.max_dim + 1, 1 << 62))
    if draw(st.booleans()):  # an empty tensor: the zero hides the dimension from the byte count
        shape = draw(st.permutations([0, dim]))
        header = task_pb2.TensorHeader(dtype=draw(st.sampled_from(DTYPES)), shape=shape)
    else:
        header = task_pb2.TensorHeader(dtype="uint8", shape=[dim], nbytes=dim)
    return _stream(draw, "dimension over max_dim", EXHAUSTED, [draw(jobs()).header([header])])


@st.composite
def huge_shape(draw: st.DrawFn) -> Case:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(1025, LIMITS.max_dim), min_size=2, max_size=2))
    nbytes = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    header = task_pb2.TensorHeader(dtype=dtype, shape=shape, nbytes=nbytes, crc32c=7)
    parts: list[Part] = [draw(jobs()).header([header]), draw(st.binary(max_size=64))]
    return _stream(draw, "huge declared shape", EXHAUSTED, parts)


@st.composite
def over_task_bytes(draw: st.DrawFn) -> Case:
    count = draw(st.integers(2, LIMITS.max_inputs))
    low = LIMITS.max_task_bytes // count + 1
    sizes = draw(
        st.lists(st.integers(low, LIMITS.max_tensor_bytes), min_size=count, max_size=count)
    )
    headers = [task_pb2.TensorHeader(dtype="uint8", shape=[n], nbytes=n) for n in sizes]
    return _stream(draw, "task over max_task_bytes", EXHAUSTED, [draw(jobs()).header(headers)])


@st.composite
def too_many_inputs(draw: st.DrawFn) -> Case:
    inputs = draw(st.lists(tensors(), min_size=LIMITS.max_inputs + 1, max_size=12))
    job = replace(draw(jobs()), inputs=tuple(inputs))
    return _stream(draw, "too many inputs", EXHAUSTED, job.parts())


@st.composite
def unknown_dtype(draw: st.DrawFn) -> Case:
    dtype = draw(st.text(max_size=12).filter(lambda d: d not in DTYPE_ITEMSIZE))
    job = draw(jobs())
    headers = _with_input(job, 0, job.inputs[0].header(dtype=dtype))
    return _stream(draw, "unknown dtype", INVALID, [job.header(headers), *job.chunks()])


@st.composite
def disallowed_dtype(draw: st.DrawFn) -> Case:
    tensor = draw(tensors(dtypes=["complex128"]))
    job = replace(draw(jobs()), inputs=(tensor,))
    return _stream(draw, "dtype not allowed", INVALID, job.parts())


@st.composite
def bad_checksum(draw: st.DrawFn) -> Case:
    job, i = draw(jobs()), draw(st.integers(0, 2))
    tensor = job.inputs[i % len(job.inputs)]
    crc = crc32c(tensor.data) ^ draw(st.integers(1, 2**32 - 1))
    headers = _with_input(job, i, tensor.header(crc32c=crc))
    return _stream(draw, "bad crc32c", INVALID, [job.header(headers), *job.chunks()])


@st.composite
def flipped_bit(draw: st.DrawFn) -> Case:
    job = draw(jobs(nonempty=True))
    data = bytearray(job.data)
    data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return _stream(draw, "flipped bit", INVALID, [job.header(), *job.chunks(bytes(data))])


@st.composite
def truncated(draw: st.DrawFn) -> Case:
    job = draw(jobs(nonempty=True))
    short = job.data[: -draw(st.integers(1, len(job.data)))]
    return _stream(draw, "truncated stream", INVALID, [job.header(), *job.chunks(short)])


@st.composite
def extra_bytes(draw: st.DrawFn) -> Case:
    job = draw(jobs())
    long = job.data + draw(st.binary(min_size=1, max_size=64))
    return _stream(draw, "extra bytes", INVALID, [job.header(), *job.chunks(long)])


@st.composite
def out_of_order(draw: st.DrawFn) -> Case:
    job = draw(jobs())
    header: Part = job.header()
    chunks: list[Part] = list(job.chunks())
    at = draw(st.integers(0, len(chunks)))
    kind = draw(st.sampled_from(["chunk first", "two headers", "empty message", "empty stream"]))
    streams: dict[str, list[Part]] = {
        "chunk first": [*chunks, header],
        "two headers": [header, *chunks[:at], header, *chunks[at:]],
        "empty message": [*[header, *chunks][: at + 1], None],
        "empty stream": [],
    }
    parts = streams[kind]
    if kind == "empty message" and draw(st.booleans()):
        parts = [None, header, *chunks]
    return _stream(draw, kind, INVALID, parts)


@st.composite
def unknown_workload(draw: st.DrawFn) -> Case:
    name = draw(st.text(max_size=30).filter(lambda w: w not in KNOWN_WORKLOADS))
    return _stream(draw, "unknown workload", INVALID, draw(jobs()).parts(workload=name))


@st.composite
def bad_params(draw: st.DrawFn) -> Case:
    job = draw(jobs())
    if draw(st.booleans()):
        many = st.dictionaries(st.text(max_size=8), param_values, min_size=LIMITS.max_params + 1)
        return _stream(draw, "too many params", EXHAUSTED, job.parts(params=draw(many)))
    params = {draw(st.text(max_size=8)): task_pb2.ParamValue()}
    return _stream(draw, "param without a value", INVALID, job.parts(params=params))


@st.composite
def bad_priority(draw: st.DrawFn) -> Case:
    high = st.integers(LIMITS.max_priority + 1, INT32_MAX)
    priority = draw(st.one_of(high, high.map(lambda p: -p)))
    return _stream(draw, "priority out of range", INVALID, draw(jobs()).parts(priority=priority))


@st.composite
def bad_timeout(draw: st.DrawFn) -> Case:
    # Submit only: Run takes the call's deadline instead of a larger timeout.
    timeout = draw(
        st.one_of(
            st.floats(max_value=-1e-9),
            st.floats(min_value=LIMITS.max_timeout_s, exclude_min=True),
            st.just(math.nan),
        )
    )
    parts = tuple(draw(jobs()).parts(timeout_seconds=timeout))
    return Case("bad timeout", INVALID, partial(_send_stream, "submit", draw(keys), parts))


@st.composite
def bad_api_key(draw: st.DrawFn) -> Case:
    junk = st.text(string.ascii_letters + string.digits + "-._~+/=", max_size=40)
    value = draw(
        st.one_of(
            st.none(),
            junk.filter(lambda k: k not in KEYS).map(lambda k: f"Bearer {k}"),
            junk,
            st.sampled_from(TENANT_KEYS).map(lambda k: f"Basic {k}"),
        )
    )
    metadata = () if value is None else (("authorization", value),)
    rpc = draw(st.sampled_from(["submit", "run", "run_many", *ID_RPCS, "list", "usage"]))
    job = draw(jobs())
    return Case("bad API key", UNAUTHENTICATED, partial(_send_unauthenticated, rpc, metadata, job))


@st.composite
def unknown_task_id(draw: st.DrawFn) -> Case:
    rpc, key = draw(st.sampled_from(ID_RPCS)), draw(keys)
    if draw(st.booleans()):
        send = partial(_send_foreign_id, rpc, key, draw(st.integers(0, 10**6)))
        return Case("other tenant's task id", NOT_FOUND, send)
    return Case("random task id", NOT_FOUND, partial(_send_task_id, rpc, key, draw(task_ids)))


@st.composite
def bad_list(draw: st.DrawFn) -> Case:
    page_size = st.one_of(st.integers(-(2**31), -1), st.integers(1001, INT32_MAX))
    request = draw(
        st.one_of(
            st.builds(broker_pb2.ListTasksRequest, page_size=page_size),
            st.builds(
                broker_pb2.ListTasksRequest, page_token=st.text(min_size=1).filter(_not_an_int)
            ),
            st.builds(broker_pb2.ListTasksRequest, states=st.lists(_bad_states, min_size=1)),
        )
    )
    return Case("bad ListTasks request", INVALID, partial(_send_list, draw(keys), request))


def _not_an_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return True
    return False


@st.composite
def oversize_message(draw: st.DrawFn) -> Case:
    size = MAX_MESSAGE_BYTES + draw(st.integers(1, 1 << 16))
    rpc = draw(st.sampled_from(["submit", "get", "run_many"]))
    return Case("oversize message", EXHAUSTED, partial(_send_oversize, rpc, draw(keys), size))


@st.composite
def run_many_batch(draw: st.DrawFn) -> Case:
    items: list[tuple[broker_pb2.InlineTask, str, Job | None]] = []
    for index in range(draw(st.integers(1, 8))):
        job = draw(jobs())
        if draw(st.booleans()):
            items.append((_inline(index, job.header(), job.data), "", job))
        else:
            items.append((*draw(bad_inline(index, job)), None))
    valid = [item for item in items if item[2] is not None]
    if draw(st.booleans()) and valid:  # an index used twice: only the second is refused
        first = draw(st.sampled_from(valid))[0]
        items.append((_inline(first.index, first.header, first.data), "INVALID_ARGUMENT", None))
    split = draw(st.integers(0, len(items)))
    send = partial(_send_run_many, draw(keys), tuple(items), split)
    hostile = any(item[2] is None for item in items)
    return Case("RunMany batch", OK, send, hostile=hostile)


def _inline(index: int, header: broker_pb2.TaskHeader, data: bytes) -> broker_pb2.InlineTask:
    return broker_pb2.InlineTask(index=index, header=header, data=data)


@st.composite
def bad_inline(draw: st.DrawFn, index: int, job: Job) -> tuple[broker_pb2.InlineTask, str]:
    tensor = job.inputs[0]
    kinds: dict[str, tuple[broker_pb2.TaskHeader, bytes, str]] = {
        "nbytes": (
            job.header(_with_input(job, 0, tensor.header(nbytes=len(tensor.data) + 1))),
            job.data,
            "INVALID_ARGUMENT",
        ),
        "crc": (
            job.header(_with_input(job, 0, tensor.header(crc32c=crc32c(tensor.data) ^ 1))),
            job.data,
            "INVALID_ARGUMENT",
        ),
        "short": (job.header(), job.data[:-1], "INVALID_ARGUMENT"),
        "long": (job.header(), job.data + b"\0", "INVALID_ARGUMENT"),
        "workload": (job.header(workload="no-such-workload"), job.data, "INVALID_ARGUMENT"),
        "priority": (job.header(priority=1000), job.data, "INVALID_ARGUMENT"),
        "params": (
            job.header(params={str(i): task_pb2.ParamValue(int_value=i) for i in range(9)}),
            job.data,
            "RESOURCE_EXHAUSTED",
        ),
        "no value": (job.header(params={"p": task_pb2.ParamValue()}), job.data, "INVALID_ARGUMENT"),
        "too big": _too_big_inline(job),
        "shape": (
            job.header([task_pb2.TensorHeader(dtype="uint8", shape=[1 << 30], nbytes=1 << 30)]),
            job.data,
            "RESOURCE_EXHAUSTED",
        ),
    }
    kind = draw(st.sampled_from(sorted(kinds)))
    if kind == "short" and not job.data:
        kind = "long"
    header, data, code = kinds[kind]
    return _inline(index, header, data), code


def _too_big_inline(job: Job) -> tuple[broker_pb2.TaskHeader, bytes, str]:
    data = bytes(INLINE_MAX_BYTES + 1)
    tensor = Tensor("uint8", (len(data),), data)
    return job.header([tensor.header()]), data, "INVALID_ARGUMENT"


@st.composite
def valid_task(draw: st.DrawFn) -> Case:
    rpc = draw(st.sampled_from(["submit"] * 4 + ["run"]))
    return Case(f"valid {rpc}", OK, partial(_send_valid, rpc, draw(keys), draw(jobs())), False)


@st.composite
def request_id_conflict(draw: st.DrawFn) -> Case:
    first, second = draw(jobs()), draw(jobs())
    if first.data == second.data:
        second = replace(second, inputs=(*second.inputs, Tensor("uint8", (1,), b"x")))
    send = partial(_send_conflict, draw(keys), first, second)
    return Case("request_id reused for other work", ALREADY_EXISTS, send)


@st.composite
def params_the_workload_refuses(draw: st.DrawFn) -> Case:
    params = draw(
        st.dictionaries(
            st.text(min_size=1, max_size=8), param_values, min_size=1, max_size=LIMITS.max_params
        )
    )
    send = partial(_send_refused_by_agent, draw(keys), draw(jobs()), params)
    return Case("params the workload refuses", INVALID, send)


FAMILIES: dict[Callable[[], st.SearchStrategy[Case]], int] = {
    valid_task: 10,
    wrong_nbytes: 2,
    negative_dim: 1,
    rank_beyond_the_wire: 1,
    rank_over_limit: 1,
    huge_dim: 2,
    huge_shape: 2,
    over_task_bytes: 1,
    too_many_inputs: 1,
    unknown_dtype: 1,
    disallowed_dtype: 1,
    bad_checksum: 2,
    flipped_bit: 2,
    truncated: 2,
    extra_bytes: 2,
    out_of_order: 3,
    unknown_workload: 2,
    bad_params: 2,
    bad_priority: 1,
    bad_timeout: 1,
    bad_api_key: 3,
    unknown_task_id: 4,
    bad_list: 1,
    oversize_message: 1,
    run_many_batch: 3,
    request_id_conflict: 1,
    params_the_workload_refuses: 1,
}
"""Each family of cases and its weight."""

DETAILS = {
    "wrong nbytes": "nbytes is",
    "negative dimension": "negative dimension",
    "rank beyond the wire format": "exceeds the maximum of 32",
    "rank over max_rank": "(max_rank)",
    "dimension over max_dim": "(max_dim)",
    "huge declared shape": "(max_tensor_bytes)",
    "task over max_task_bytes": "(max_task_bytes)",
    "too many inputs": "inputs exceed the limit",
    "unknown dtype": "unknown dtype",
    "dtype not allowed": "is not accepted",
    "bad crc32c": "crc32c",
    "flipped bit": "crc32c",
    "truncated stream": "stream ended after",
    "extra bytes": "more bytes than",
    "chunk first": "must start with a header",
    "empty message": "header",
    "empty stream": "must start with a header",
    "two headers": "only chunk messages",
    "unknown workload": "workload",
    "too many params": "params exceed the limit",
    "param without a value": "has no value",
    "priority out of range": "priority",
    "bad timeout": "(max_timeout_s)",
    "bad API key": "api key",
    "other tenant's task id": "not found",
    "random task id": "not found",
    "oversize message": "larger than max",
    "request_id reused for other work": "already used",
    "params the workload refuses": "unknown parameter",
}
"""A few words each family's refusal must say (case-insensitive)."""

batches = st.tuples(*(f() for f, weight in FAMILIES.items() for _ in range(weight))).flatmap(
    st.permutations
)


# -- sending -----------------------------------------------------------------------------------

Metadata = tuple[tuple[str, str], ...]


def _auth(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def _messages(cls: Any, parts: Sequence[Part]) -> Iterator[Any]:
    for part in parts:
        if part is None:
            yield cls()
        elif isinstance(part, bytes):
            yield cls(chunk=task_pb2.DataChunk(data=part))
        else:
            yield cls(header=part)


async def _submit(h: Harness, parts: Sequence[Part], metadata: Metadata) -> Any:
    requests = _messages(broker_pb2.SubmitRequest, parts)
    return await h.stub.Submit(requests, metadata=metadata, timeout=30)


async def _run(h: Harness, parts: Sequence[Part], metadata: Metadata) -> tuple[Any, bytes]:
    call = h.stub.Run(_messages(broker_pb2.RunRequest, parts), metadata=metadata, timeout=30)
    task, data = task_pb2.TaskInfo(), bytearray()
    async for response in call:
        if response.WhichOneof("kind") == "task":
            task = response.task
        else:
            data += response.chunk.data
    return task, bytes(data)


async def _call_with_id(h: Harness, rpc: str, task_id: str, metadata: Metadata) -> None:
    if rpc == "get":
        get = broker_pb2.GetTaskRequest(task_id=task_id)
        await h.stub.GetTask(get, metadata=metadata, timeout=30)
    elif rpc == "cancel":
        cancel = broker_pb2.CancelTaskRequest(task_id=task_id)
        await h.stub.CancelTask(cancel, metadata=metadata, timeout=30)
    elif rpc == "watch":
        watch = broker_pb2.WatchTaskRequest(task_id=task_id)
        async for _ in h.stub.WatchTask(watch, metadata=metadata, timeout=30):
            pass
    else:
        result = broker_pb2.GetResultRequest(task_id=task_id)
        async for _ in h.stub.GetResult(result, metadata=metadata, timeout=30):
            pass


async def _run_many(h: Harness, requests: list[Any], metadata: Metadata) -> list[Any]:
    call = h.stub.RunMany(iter(requests), metadata=metadata, timeout=30)
    return [outcome async for response in call for outcome in response.outcomes]


def _assert_echoed(task: Any, data: bytes, job: Job) -> None:
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED, task
    assert [(o.dtype, tuple(o.shape)) for o in task.outputs] == [
        (t.dtype, t.shape) for t in job.inputs
    ]
    assert data == job.data


async def _send_stream(rpc: str, key: str, parts: Sequence[Part], h: Harness) -> None:
    if rpc == "submit":
        await _submit(h, parts, _auth(key))
    else:
        await _run(h, parts, _auth(key))


async def _send_valid(rpc: str, key: str, job: Job, h: Harness) -> None:
    if rpc == "submit":
        reply = await _submit(h, job.parts(), _auth(key))
        h.pending[reply.task_id] = (key, job)
        h.owned[key].append(reply.task_id)
    else:
        task, data = await _run(h, job.parts(), _auth(key))
        _assert_echoed(task, data, job)
        h.owned[key].append(task.task_id)
    h.created[key] += 1


async def _send_task_id(rpc: str, key: str, task_id: str, h: Harness) -> None:
    await _call_with_id(h, rpc, task_id, _auth(key))


async def _send_foreign_id(rpc: str, key: str, pick: int, h: Harness) -> None:
    theirs = next(h.owned[k] for k in TENANT_KEYS if k != key)
    task_id = theirs[pick % len(theirs)] if theirs else uuid.uuid4().hex
    await _call_with_id(h, rpc, task_id, _auth(key))


async def _send_unauthenticated(rpc: str, metadata: Metadata, job: Job, h: Harness) -> None:
    if rpc == "submit":
        await _submit(h, job.parts(), metadata)
    elif rpc == "run":
        await _run(h, job.parts(), metadata)
    elif rpc == "run_many":
        batch = broker_pb2.RunManyRequest(tasks=[_inline(0, job.header(), job.data)])
        await _run_many(h, [batch], metadata)
    elif rpc == "list":
        await h.stub.ListTasks(broker_pb2.ListTasksRequest(), metadata=metadata, timeout=30)
    elif rpc == "usage":
        await h.stub.GetUsage(broker_pb2.GetUsageRequest(), metadata=metadata, timeout=30)
    else:
        await _call_with_id(h, rpc, uuid.uuid4().hex, metadata)


async def _send_list(key: str, request: Any, h: Harness) -> None:
    await h.stub.ListTasks(request, metadata=_auth(key), timeout=30)


async def _send_oversize(rpc: str, key: str, size: int, h: Harness) -> None:
    # A small, valid header: only the size of the next message is wrong.
    tensor = Tensor("uint8", (4,), b"abcd")
    job = Job((tensor,), 0, 0.0, ())
    if rpc == "submit":
        await _submit(h, [job.header(), bytes(size)], _auth(key))
    elif rpc == "get":
        await _call_with_id(h, "get", "x" * size, _auth(key))
    else:
        batch = broker_pb2.RunManyRequest(tasks=[_inline(0, job.header(), bytes(size))])
        await _run_many(h, [batch], _auth(key))


async def _send_run_many(
    key: str, items: Sequence[tuple[Any, str, Job | None]], split: int, h: Harness
) -> None:
    tasks = [task for task, _, _ in items]
    requests = [broker_pb2.RunManyRequest(tasks=tasks[:split])]
    requests.append(broker_pb2.RunManyRequest(tasks=tasks[split:]))
    outcomes = await _run_many(h, requests, _auth(key))

    got = sorted((o.index, o.error_code) for o in outcomes)
    assert got == sorted((task.index, code) for task, code, _ in items), outcomes
    for task, _, job in items:
        if job is not None:
            (outcome,) = [o for o in outcomes if o.index == task.index and not o.error_code]
            assert outcome.data_inline
            _assert_echoed(outcome.task, outcome.data, job)
            h.owned[key].append(outcome.task.task_id)
            h.created[key] += 1


async def _send_conflict(key: str, first: Job, second: Job, h: Harness) -> None:
    request_id = uuid.uuid4().hex
    reply = await _submit(h, first.parts(request_id=request_id), _auth(key))
    h.pending[reply.task_id] = (key, first)
    h.owned[key].append(reply.task_id)
    h.created[key] += 1
    again = await _submit(h, first.parts(request_id=request_id), _auth(key))
    assert again.deduplicated and again.task_id == reply.task_id

    await _submit(h, second.parts(request_id=request_id), _auth(key))


async def _send_refused_by_agent(
    key: str, job: Job, params: dict[str, task_pb2.ParamValue], h: Harness
) -> None:
    h.created[key] += 1  # the task is accepted, then fails on the agent
    h.failed[key] += 1
    await _run(h, job.parts(params=params), _auth(key))


# -- the broker under test -----------------------------------------------------------------------


class Harness:
    """One broker, one agent, one channel, and what the valid tasks must come back as."""

    def __init__(self, server: BrokerServer, spool_dir: Path, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.spool_dir = spool_dir
        self.stub = broker_pb2_grpc.BrokerStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.pending: dict[str, tuple[str, Job]] = {}
        """Valid tasks submitted without waiting: task id -> (API key, job)."""
        self.owned: dict[str, list[str]] = {key: [] for key in TENANT_KEYS}
        self.created: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.hostile = 0

    async def check(self, case: Case) -> None:
        """Sends one case and asserts it ended with its status code and a message."""
        self.sent[case.family] += 1
        self.hostile += case.hostile
        try:
            await case.send(self)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
        else:
            code, details = OK, ""
        assert code == case.expected, f"{case}: got {code.name}: {details}"
        assert code == OK or details.strip(), f"{case}: {code.name} without a message"
        assert DETAILS.get(case.family, "").lower() in details.lower(), f"{case}: {details}"

    async def tasks(self, key: str) -> list[Any]:
        """Every task of the key's tenant."""
        found: list[Any] = []
        token = ""
        while True:
            request = broker_pb2.ListTasksRequest(page_size=1000, page_token=token)
            page = await self.stub.ListTasks(request, metadata=_auth(key), timeout=30)
            found += page.tasks
            if not (token := page.next_page_token):
                return found

    async def result(self, key: str, task_id: str) -> tuple[Any, bytes]:
        """A task's final state and output bytes."""
        request = broker_pb2.GetResultRequest(task_id=task_id)
        header, data = None, bytearray()
        async for response in self.stub.GetResult(request, metadata=_auth(key), timeout=60):
            if response.WhichOneof("kind") == "header":
                header = response.header
            else:
                data += response.chunk.data
        return header, bytes(data)


async def _wait_for_agent(server: BrokerServer) -> None:
    for _ in range(1200):
        if "echo" in server.dispatcher.known_workloads and len(server.dispatcher.registry):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the agent did not connect within 60 s")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def harness(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    root = tmp_path_factory.mktemp("hostile")
    settings = broker_settings(
        root, api_keys=KEYS, heartbeat_interval_s=0.5, lease_timeout_s=30.0, limits=LIMITS
    )
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with running_broker(settings) as server:
        agent = AgentProcess(root, f"127.0.0.1:{server.port}", "hostile", slots=4).start()
        try:
            await _wait_for_agent(server)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options) as channel:
                yield Harness(server, settings.spool_dir, channel)
        finally:
            await asyncio.to_thread(agent.stop)


# -- tests -----------------------------------------------------------------------------------


async def test_an_unknown_workload_is_refused_before_anything_runs(harness: Harness) -> None:
    before = len(await harness.tasks("key-a"))
    job = Job((Tensor("uint8", (2,), b"hi"),), 0, 0.0, ())
    header = job.header(workload="os.system")
    batch = broker_pb2.RunManyRequest(tasks=[_inline(0, header, job.data)])

    refusals = []
    for rpc in ("submit", "run"):
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await _send_stream(rpc, "key-a", [header, *job.chunks()], harness)
        refusals.append((excinfo.value.code().name, excinfo.value.details() or ""))
    (outcome,) = await _run_many(harness, [batch], _auth("key-a"))
    refusals.append((outcome.error_code, outcome.error_message))

    assert [code for code, _ in refusals] == ["INVALID_ARGUMENT"] * 3
    assert all("unknown workload 'os.system'" in message for _, message in refusals)
    assert len(await harness.tasks("key-a")) == before


async def test_hostile_requests_get_their_exact_status_and_lose_no_valid_task(
    harness: Harness,
) -> None:
    before = {key: len(await harness.tasks(key)) for key in TENANT_KEYS}
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(batch=batches)
    def send(batch: list[Case]) -> None:
        for case in batch:
            asyncio.run_coroutine_threadsafe(harness.check(case), loop).result(timeout=60)

    await asyncio.to_thread(send)  # the loop stays free to serve while Hypothesis draws

    for task_id, (key, job) in harness.pending.items():
        _assert_echoed(*await harness.result(key, task_id), job)
    for key in TENANT_KEYS:
        states = Counter(t.state for t in await harness.tasks(key))
        assert sum(states.values()) == before[key] + harness.created[key]
        assert states[task_pb2.TASK_STATE_FAILED] == harness.failed[key]
    assert harness.hostile >= 1000, harness.sent
    assert len(harness.sent) >= 30, harness.sent
    assert not list(harness.spool_dir.rglob("*.part"))
    health = await harness.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

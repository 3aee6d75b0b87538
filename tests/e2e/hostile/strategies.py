"""Hypothesis strategies for the hostile test: one family of cases each, and their weights."""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

import grpc
from hypothesis import strategies as st

from gpubroker.protos import broker_pb2, task_pb2
from gpubroker.protos.transport import MAX_MESSAGE_BYTES
from gpubroker.protos.wire import DTYPE_ITEMSIZE, INLINE_MAX_BYTES, MAX_RANK, crc32c
from tests.e2e.hostile.cases import (
    ALREADY_EXISTS,
    DTYPES,
    EXHAUSTED,
    INT32_MAX,
    INT64_MAX,
    INVALID,
    KEYS,
    KNOWN_WORKLOADS,
    LIMITS,
    NOT_FOUND,
    OK,
    TENANT_KEYS,
    UNAUTHENTICATED,
    Case,
    Job,
    Part,
    Tensor,
    inline_task,
)
from tests.e2e.hostile.harness import (
    send_conflict,
    send_foreign_id,
    send_list,
    send_oversize,
    send_refused_by_agent,
    send_run_many,
    send_stream,
    send_task_id,
    send_unauthenticated,
    send_valid,
)

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
    return Case(family, code, partial(send_stream, rpc, draw(keys), tuple(parts)))


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
    return Case("bad timeout", INVALID, partial(send_stream, "submit", draw(keys), parts))


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
    return Case("bad API key", UNAUTHENTICATED, partial(send_unauthenticated, rpc, metadata, job))


@st.composite
def unknown_task_id(draw: st.DrawFn) -> Case:
    rpc, key = draw(st.sampled_from(ID_RPCS)), draw(keys)
    if draw(st.booleans()):
        send = partial(send_foreign_id, rpc, key, draw(st.integers(0, 10**6)))
        return Case("other tenant's task id", NOT_FOUND, send)
    return Case("random task id", NOT_FOUND, partial(send_task_id, rpc, key, draw(task_ids)))


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
    return Case("bad ListTasks request", INVALID, partial(send_list, draw(keys), request))


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
    return Case("oversize message", EXHAUSTED, partial(send_oversize, rpc, draw(keys), size))


@st.composite
def run_many_batch(draw: st.DrawFn) -> Case:
    items: list[tuple[broker_pb2.InlineTask, str, Job | None]] = []
    for index in range(draw(st.integers(1, 8))):
        job = draw(jobs())
        if draw(st.booleans()):
            items.append((inline_task(index, job.header(), job.data), "", job))
        else:
            items.append((*draw(bad_inline(index, job)), None))
    valid = [item for item in items if item[2] is not None]
    if draw(st.booleans()) and valid:  # an index used twice: only the second is refused
        first = draw(st.sampled_from(valid))[0]
        items.append((inline_task(first.index, first.header, first.data), "INVALID_ARGUMENT", None))
    split = draw(st.integers(0, len(items)))
    send = partial(send_run_many, draw(keys), tuple(items), split)
    hostile = any(item[2] is None for item in items)
    return Case("RunMany batch", OK, send, hostile=hostile)


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
    return inline_task(index, header, data), code


def _too_big_inline(job: Job) -> tuple[broker_pb2.TaskHeader, bytes, str]:
    data = bytes(INLINE_MAX_BYTES + 1)
    tensor = Tensor("uint8", (len(data),), data)
    return job.header([tensor.header()]), data, "INVALID_ARGUMENT"


@st.composite
def valid_task(draw: st.DrawFn) -> Case:
    rpc = draw(st.sampled_from(["submit"] * 4 + ["run"]))
    return Case(f"valid {rpc}", OK, partial(send_valid, rpc, draw(keys), draw(jobs())), False)


@st.composite
def request_id_conflict(draw: st.DrawFn) -> Case:
    first, second = draw(jobs()), draw(jobs())
    if first.data == second.data:
        second = replace(second, inputs=(*second.inputs, Tensor("uint8", (1,), b"x")))
    send = partial(send_conflict, draw(keys), first, second)
    return Case("request_id reused for other work", ALREADY_EXISTS, send)


@st.composite
def params_the_workload_refuses(draw: st.DrawFn) -> Case:
    params = draw(
        st.dictionaries(
            st.text(min_size=1, max_size=8), param_values, min_size=1, max_size=LIMITS.max_params
        )
    )
    send = partial(send_refused_by_agent, draw(keys), draw(jobs()), params)
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

batches = st.tuples(*(f() for f, weight in FAMILIES.items() for _ in range(weight))).flatmap(
    st.permutations
)

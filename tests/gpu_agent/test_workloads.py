"""The built-in workloads on the CPU: results against plain torch, validation, cancellation."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import EntryPoint

import pytest
import torch
import torch.nn.functional as F

from gpubroker.gpu_agent import workloads
from gpubroker.gpu_agent.errors import (
    TaskCancelledError,
    UnknownWorkloadError,
    WorkloadArgumentError,
    WorkloadLoadError,
)
from gpubroker.gpu_agent.workloads import (
    Param,
    WorkloadContext,
    example,
    lookup,
    register,
    registry,
)
from tests.support.tensors import random_tensor as rnd

BUILTINS = {"matmul", "add", "sum", "conv2d", "fft", "linalg.solve", "echo", "sleep"}

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.complex64, torch.complex128,
]  # fmt: skip


def _call(
    name: str,
    inputs: Sequence[torch.Tensor],
    params: Mapping[str, Param] | None = None,
    cancelled: threading.Event | None = None,
) -> list[torch.Tensor]:
    ctx = WorkloadContext(torch.device("cpu"), cancelled or threading.Event())
    return list(lookup(name)(inputs, params or {}, ctx))


def _custom_workload(
    inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
) -> Sequence[torch.Tensor]:
    return [inputs[0] * 2]


def test_every_builtin_is_registered() -> None:
    assert set(registry()) >= BUILTINS


@pytest.mark.parametrize("name", sorted(BUILTINS - {"echo", "sleep"}))
def test_each_computing_builtin_has_a_valid_warm_up_example(name: str) -> None:
    make = example(name, lookup(name))
    assert make is not None
    inputs, params = make()

    outputs = _call(name, inputs, params)

    assert outputs and all(isinstance(t, torch.Tensor) for t in outputs)


def test_an_operator_workload_brings_its_example_as_an_attribute() -> None:
    def scale(
        inputs: Sequence[torch.Tensor], params: Mapping[str, Param], ctx: WorkloadContext
    ) -> Sequence[torch.Tensor]:
        return [inputs[0] * 2]

    assert example("scale", scale) is None
    scale.example = lambda: ([torch.ones(2)], {})  # type: ignore[attr-defined]
    assert example("scale", scale) is scale.example  # type: ignore[attr-defined]
    # A workload that only shares a built-in's name does not get the built-in's example.
    assert example("matmul", _custom_workload) is None


def test_an_unknown_workload_error_names_the_known_ones() -> None:
    with pytest.raises(UnknownWorkloadError, match=r"'nope'.*linalg\.solve.*matmul"):
        lookup("nope")


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="matmul"):
        register("matmul")(_custom_workload)


def test_operator_workloads_are_loaded_from_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = EntryPoint("double", f"{__name__}:_custom_workload", "gpubroker.workloads")
    monkeypatch.setattr(workloads, "entry_points", lambda group: [entry])

    found = registry()

    assert found["double"] is _custom_workload
    assert set(found) >= BUILTINS


def test_an_entry_point_that_shadows_a_builtin_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = EntryPoint("matmul", f"{__name__}:_custom_workload", "gpubroker.workloads")
    monkeypatch.setattr(workloads, "entry_points", lambda group: [entry])

    with pytest.raises(WorkloadLoadError, match="matmul"):
        registry()


def test_a_broken_entry_point_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = EntryPoint("broken", "tests.no_such_module:fn", "gpubroker.workloads")
    monkeypatch.setattr(workloads, "entry_points", lambda group: [entry])

    with pytest.raises(WorkloadLoadError, match="no_such_module"):
        registry()


def test_an_entry_point_named_like_a_model_workload_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = EntryPoint("model:abc", f"{__name__}:_custom_workload", "gpubroker.workloads")
    monkeypatch.setattr(workloads, "entry_points", lambda group: [entry])

    with pytest.raises(WorkloadLoadError, match="uploaded models"):
        registry()


def test_an_entry_point_whose_import_raises_anything_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Exploding(EntryPoint):
        def load(self) -> object:
            raise RuntimeError("needs a licence server")

    entry = Exploding("boom", "pkg:fn", "gpubroker.workloads")
    monkeypatch.setattr(workloads, "entry_points", lambda group: [entry])

    with pytest.raises(WorkloadLoadError, match="licence server"):
        registry()


def _conv_inputs() -> list[torch.Tensor]:
    return [
        rnd((2, 4, 9, 9), torch.float32, 1),
        rnd((6, 2, 3, 3), torch.float32, 2),
    ]


MATCH_TORCH = [
    ("matmul", [rnd((5, 4), torch.float32, 1), rnd((4, 3), torch.float32, 2)], {},
     lambda a, b: a @ b),
    ("matmul", [rnd((2, 5, 4), torch.float64, 1), rnd((4,), torch.float64, 2)], {},
     lambda a, b: a @ b),
    ("add", [rnd((4, 1, 3), torch.float64, 3), rnd((5, 3), torch.float64, 4)], {},
     lambda a, b: a + b),
    ("add", [rnd((3,), torch.int32, 3), rnd((3,), torch.float32, 4)], {},
     lambda a, b: a + b),
    ("sum", [rnd((4, 6), torch.float32, 5)], {}, lambda x: x.sum()),
    ("sum", [rnd((4, 6), torch.float32, 5)], {"dim": 1, "keepdim": True},
     lambda x: x.sum(dim=1, keepdim=True)),
    ("sum", [rnd((4, 6), torch.int64, 5)], {"dim": -2}, lambda x: x.sum(dim=-2)),
    ("conv2d", [*_conv_inputs(), rnd((6,), torch.float32, 3)],
     {"stride": 2, "padding": 1, "dilation": 2, "groups": 2},
     lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, dilation=2, groups=2)),
    ("fft", [rnd((4, 32), torch.float32, 9)], {}, torch.fft.fft),
    ("fft", [rnd((4, 6), torch.complex128, 9)], {"n": 8, "dim": 0, "norm": "ortho"},
     lambda x: torch.fft.fft(x, n=8, dim=0, norm="ortho")),
    ("linalg.solve",
     [rnd((8, 8), torch.float64, 10) + 8 * torch.eye(8, dtype=torch.float64),
      rnd((8, 3), torch.float64, 11)], {}, torch.linalg.solve),
    ("linalg.solve",
     [rnd((2, 4, 4), torch.float32, 10) + 4 * torch.eye(4), rnd((2, 4), torch.float32, 11)],
     {}, torch.linalg.solve),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "inputs", "params", "expected"),
    MATCH_TORCH,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(MATCH_TORCH)],
)
def test_each_builtin_matches_plain_torch(
    name: str, inputs: list[torch.Tensor], params: dict[str, Param], expected: object
) -> None:
    assert callable(expected)
    want = expected(*inputs)

    (got,) = _call(name, inputs, params)

    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_fft_returns_complex_output() -> None:
    (got,) = _call("fft", [torch.ones(8)])

    assert got.dtype == torch.complex64


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_echo_returns_every_dtype_bit_exact(dtype: torch.dtype) -> None:
    tensor = rnd((3, 5, 2), dtype)

    (got,) = _call("echo", [tensor])

    assert got.dtype == dtype and got.shape == tensor.shape
    assert got.view(torch.uint8).equal(tensor.view(torch.uint8))


def test_echo_keeps_nan_payloads_and_negative_zero_bit_exact() -> None:
    bits = torch.tensor([0x7FC00001, 0x7F800001, 0x80000000, 0xFF800000], dtype=torch.int64)
    tensor = bits.to(torch.int32).view(torch.float32)

    (got,) = _call("echo", [tensor])

    assert got.view(torch.int32).equal(tensor.view(torch.int32))


def test_echo_takes_any_number_of_inputs_including_scalars_and_empty_tensors() -> None:
    inputs = [
        torch.tensor(2.5, dtype=torch.bfloat16),
        torch.empty(0, dtype=torch.complex64),
        torch.empty(3, 0, 2, dtype=torch.bool),
        torch.tensor(True),
    ]

    got = _call("echo", inputs)

    assert len(got) == 4
    for sent, back in zip(inputs, got, strict=True):
        assert back.dtype == sent.dtype and back.shape == sent.shape
        assert torch.equal(back, sent)
    assert _call("echo", []) == []


BAD_ARGUMENTS = [
    ("matmul", [torch.ones(2, 3)], {}, "matmul takes 2 input tensors, got 1"),
    ("matmul", [torch.ones(2, 3), torch.ones(2, 3)], {},
     r"a of shape \[2, 3\] has 3 columns but b of shape \[2, 3\] has 2 rows"),
    ("matmul", [torch.ones(2, 3), torch.ones(3, 2, dtype=torch.float64)], {},
     "must share a dtype; got float32, float64"),
    ("matmul", [torch.ones(2, 2, dtype=torch.int64)] * 2, {}, "got int64, int64"),
    ("matmul", [torch.ones(2, 3, 4), torch.ones(3, 4, 2)], {},
     r"batch dimensions \[2\] and \[3\] do not broadcast"),
    ("matmul", [torch.ones(2, 2), torch.ones(2, 2)], {"transpose": True},
     "unknown parameter.*transpose; it takes no parameters"),
    ("add", [torch.ones(2, 3), torch.ones(4)], {}, r"shapes \[2, 3\] and \[4\] do not broadcast"),
    ("sum", [torch.ones(2)], {"axis": 0}, "unknown parameter.*axis; it takes dim, keepdim"),
    ("sum", [torch.ones(2)], {"dim": "0"}, "'dim' must be an integer, got '0'"),
    ("sum", [torch.ones(2)], {"dim": True}, "'dim' must be an integer, got True"),
    ("sum", [torch.ones(2)], {"keepdim": 1}, "'keepdim' must be a boolean, got 1"),
    ("sum", [torch.ones(2, 3)], {"dim": 2},
     r"dim 2 is out of range for a tensor of shape \[2, 3\]"),
    ("sum", [torch.ones(2), torch.ones(2)], {}, "sum takes 1 input tensors, got 2"),
    ("conv2d", [torch.ones(1, 2, 4, 4)], {}, "conv2d takes 2 to 3 input tensors, got 1"),
    ("conv2d", [torch.ones(1, 2, 4, 4), torch.ones(3, 4, 3, 3)], {},
     r"input has 2 channels and weight of shape \[3, 4, 3, 3\] with groups=1 expects 4"),
    ("conv2d", [torch.ones(1, 2, 4, 4), torch.ones(3, 2, 3, 3), torch.ones(4)], {},
     r"bias must have shape \[3\], got \[4\]"),
    ("conv2d", [torch.ones(1, 2, 4, 4), torch.ones(3, 2, 5, 5)], {},
     "spans 5 but the padded input is 4 wide"),
    ("conv2d", [torch.ones(1, 2, 4, 4), torch.ones(3, 2, 3, 3)], {"stride": 0},
     "stride must be at least 1, got 0"),
    ("conv2d", [torch.ones(2, 4, 4), torch.ones(2, 2, 3)], {}, r"weight 4-d; got shapes"),
    ("fft", [torch.ones(4)], {"norm": "loud"}, "'norm' must be one of backward, forward, ortho"),
    ("fft", [torch.ones(4)], {"n": 0}, "n must be at least 1, got 0"),
    ("fft", [torch.ones(4)], {"dim": 1}, r"dim 1 is out of range for a tensor of shape \[4\]"),
    ("fft", [torch.tensor(1.0)], {}, "at least 1 dimension"),
    ("fft", [torch.ones(4, dtype=torch.float16)], {}, "float16 input is not supported"),
    ("linalg.solve", [torch.ones(2, 3), torch.ones(2, 1)], {},
     r"square matrices, got shape \[2, 3\]"),
    ("linalg.solve", [torch.eye(3), torch.ones(2, 1)], {},
     r"A of shape \[3, 3\] needs B with 3 rows, got B of shape \[2, 1\]"),
    ("linalg.solve", [torch.zeros(2, 2), torch.ones(2, 1)], {}, "singular"),
    ("echo", [torch.ones(1)], {"x": 1}, "unknown parameter.*x"),
    ("sleep", [], {"seconds": 99999.0}, "seconds must be within 0..3600, got 99999.0"),
    ("sleep", [], {"seconds": -1}, "got -1.0"),
    ("sleep", [], {"seconds": "soon"}, "'seconds' must be a number, got 'soon'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "inputs", "params", "message"),
    BAD_ARGUMENTS,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD_ARGUMENTS)],
)
def test_bad_arguments_are_refused_with_their_numbers(
    name: str, inputs: list[torch.Tensor], params: dict[str, Param], message: str
) -> None:
    with pytest.raises(WorkloadArgumentError, match=message):
        _call(name, inputs, params)


def test_a_float_param_accepts_an_integer() -> None:
    (got,) = _call("sleep", [torch.ones(2)], {"seconds": 0})

    assert torch.equal(got, torch.ones(2))


def test_sleep_waits_then_returns_its_inputs() -> None:
    started = time.monotonic()

    got = _call("sleep", [torch.arange(3)], {"seconds": 0.1})

    assert time.monotonic() - started >= 0.1
    assert torch.equal(got[0], torch.arange(3))


def test_sleep_stops_soon_after_it_is_cancelled() -> None:
    cancelled = threading.Event()
    timer = threading.Timer(0.1, cancelled.set)
    timer.start()
    started = time.monotonic()

    with pytest.raises(TaskCancelledError):
        _call("sleep", [], {"seconds": 30.0}, cancelled)

    assert time.monotonic() - started < 1.0
    timer.join()

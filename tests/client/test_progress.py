"""Progress callbacks of the calls that move tensors: totals, order and the final report.

Every test runs with both clients (``Client`` in a thread, ``AsyncClient``) against the fake
broker, whose 7-byte input chunks and 5-byte result chunks make each transfer many reports.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import redirect_stderr
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gpubroker.client.progress import Direction, ProgressBar, counted_upload, progress_callback
from gpubroker.protos import broker_pb2
from gpubroker.protos.frames import chunk_messages
from tests.fakes.broker import FakeBroker


class Recorder:
    """A progress callback that keeps every report."""

    def __init__(self) -> None:
        self.reports: list[tuple[Direction, int, int]] = []

    def __call__(self, direction: Direction, done: int, total: int) -> None:
        self.reports.append((direction, done, total))

    def of(self, direction: Direction) -> list[tuple[int, int]]:
        """The (done, total) reports of one direction, in order."""
        return [(d, t) for way, d, t in self.reports if way == direction]


def assert_complete(reports: list[tuple[int, int]], total: int) -> None:
    """One transfer of ``total`` bytes: starts at 0, grows monotonically, ends at ``total``."""
    assert reports, "no progress was reported"
    assert {t for _, t in reports} == {total}
    done = [d for d, _ in reports]
    assert done[0] == 0
    assert done == sorted(done)
    assert done[-1] == total
    assert all(0 <= d <= total for d in done)


def _inputs() -> list[np.ndarray[Any, Any]]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((13, 5)).astype(np.float32), np.arange(9, dtype=np.int64)]


async def test_run_reports_its_upload_then_its_download(client: Any) -> None:
    inputs = _inputs()
    total = sum(a.nbytes for a in inputs)
    recorder = Recorder()

    result = await client.run("echo", inputs, progress=recorder)

    assert_complete(recorder.of("upload"), total)
    assert_complete(recorder.of("download"), total)  # echo: the outputs are the inputs
    ways = [way for way, _, _ in recorder.reports]
    assert ways == sorted(ways, key=["upload", "download"].index)
    assert len(recorder.of("upload")) > 2 and len(recorder.of("download")) > 2
    np.testing.assert_array_equal(result.outputs[0], inputs[0])


async def test_submit_reports_the_upload_and_result_the_download(client: Any) -> None:
    inputs = _inputs()
    total = sum(a.nbytes for a in inputs)
    sent, received = Recorder(), Recorder()

    handle = await client.submit("echo", inputs, progress=sent)
    result = await handle.result(timeout=30, progress=received)

    assert_complete(sent.of("upload"), total)
    assert sent.of("download") == []
    assert_complete(received.of("download"), total)
    assert received.of("upload") == []
    np.testing.assert_array_equal(result.outputs[1], inputs[1])


async def test_a_transfer_of_no_bytes_reports_zero_of_zero(client: Any) -> None:
    recorder = Recorder()

    await client.run("echo", np.zeros((0, 3), dtype=np.float32), progress=recorder)

    assert recorder.of("upload") == [(0, 0)]
    assert recorder.of("download") == [(0, 0)]


async def test_upload_model_reports_the_model_file_and_nothing_when_held(
    client: Any, fake: FakeBroker
) -> None:
    net = nn.Sequential(nn.Linear(8, 4))
    first, again = Recorder(), Recorder()

    await client.upload_model(net, [torch.randn(2, 8)], progress=first)
    await client.upload_model(net, [torch.randn(2, 8)], progress=again)

    assert_complete(first.of("upload"), fake.model_bytes_received)
    assert again.reports == []  # already held: nothing sent


async def test_a_failed_task_never_reports_a_download(client: Any) -> None:
    recorder = Recorder()

    with pytest.raises(Exception, match="boom"):
        await client.run("fail", np.ones(4, dtype=np.float32), progress=recorder)

    assert recorder.of("download") == []


def test_progress_true_draws_a_bar_on_stderr_for_a_large_enough_transfer() -> None:
    bar = progress_callback(True)
    assert isinstance(bar, ProgressBar)
    small = ProgressBar(min_bytes=1000)
    stderr = io.StringIO()

    with redirect_stderr(stderr):
        small("upload", 0, 999)  # under the floor: nothing
        drawn = ProgressBar(min_bytes=0, label="x.npy")
        for done in (0, 500, 1000):
            drawn("download", done, 1000)

    assert "x.npy download" in stderr.getvalue()
    assert "999" not in stderr.getvalue()


@pytest.mark.parametrize("bad", ["yes", 3])
def test_progress_refuses_what_is_neither_a_callable_nor_a_flag(bad: object) -> None:
    with pytest.raises(TypeError, match="progress must be"):
        progress_callback(bad)  # type: ignore[arg-type]


def test_counted_upload_counts_the_chunk_payloads_not_their_framing() -> None:
    buffers = [b"a" * 10, b"b" * 25]
    recorder = Recorder()
    header = broker_pb2.SubmitRequest(header=broker_pb2.TaskHeader(workload="w"))
    stream: list[Any] = [header, *chunk_messages(broker_pb2.SubmitRequest, buffers, 8)]

    passed = list(counted_upload(broker_pb2.SubmitRequest, stream, 35, recorder))

    assert passed == stream
    assert recorder.of("upload") == [(0, 35), (8, 35), (16, 35), (24, 35), (32, 35), (35, 35)]


def test_no_callback_passes_the_stream_through_untouched() -> None:
    stream: list[Any] = [b"x", b"y"]
    report: Callable[[Direction, int, int], None] | None = None

    assert list(counted_upload(broker_pb2.SubmitRequest, stream, 2, report)) == stream

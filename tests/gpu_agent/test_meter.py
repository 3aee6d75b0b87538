"""The device meter: overlapping compute windows split the device's busy time between them."""

from __future__ import annotations

import itertools
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpubroker.gpu_agent.meter import DeviceMeter

NS = 1_000_000_000


class FakeClock:
    """A monotonic nanosecond clock that stands still until a test moves it."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def at(self, seconds: float) -> None:
        """Sets the clock to ``seconds`` after its origin."""
        self.ns = round(seconds * NS)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def meter(clock: FakeClock) -> DeviceMeter:
    return DeviceMeter(clock)


def test_a_window_alone_is_billed_its_length(clock: FakeClock, meter: DeviceMeter) -> None:
    clock.at(2.0)
    token = meter.enter()
    clock.at(5.25)

    share = meter.leave(token)

    assert share == 3.25
    assert meter.busy_seconds == meter.billed_seconds == 3.25


def test_two_windows_overlapping_by_half_are_billed_seven_and_a_half_each(
    clock: FakeClock, meter: DeviceMeter
) -> None:
    clock.at(0)
    first = meter.enter()
    clock.at(5)
    second = meter.enter()
    clock.at(10)
    first_share = meter.leave(first)
    clock.at(15)
    second_share = meter.leave(second)

    assert first_share == second_share == 7.5  # 5 alone + half of the 5 shared
    assert meter.busy_seconds == meter.billed_seconds == 15.0  # not 20


def test_a_window_nested_in_another_shares_only_its_own_span(
    clock: FakeClock, meter: DeviceMeter
) -> None:
    clock.at(0)
    outer = meter.enter()
    clock.at(2)
    inner = meter.enter()
    clock.at(4)
    inner_share = meter.leave(inner)
    clock.at(10)
    outer_share = meter.leave(outer)

    assert inner_share == 1.0
    assert outer_share == 9.0
    assert meter.billed_seconds == 10.0


def test_three_windows_open_at_once_each_pay_a_third_of_that_time(
    clock: FakeClock, meter: DeviceMeter
) -> None:
    # A over [0, 6], B over [1, 5], C over [2, 5]: [2, 5] is shared three ways.
    tokens = {}
    for name, start in (("a", 0), ("b", 1), ("c", 2)):
        clock.at(start)
        tokens[name] = meter.enter()
    clock.at(5)
    b, c = meter.leave(tokens["b"]), meter.leave(tokens["c"])
    clock.at(6)
    a = meter.leave(tokens["a"])

    assert c == pytest.approx(1.0)
    assert b == pytest.approx(0.5 + 1.0)
    assert a == pytest.approx(1 + 0.5 + 1.0 + 1)
    assert a + b + c == pytest.approx(6.0)


def test_time_with_no_window_open_is_neither_busy_nor_billed(
    clock: FakeClock, meter: DeviceMeter
) -> None:
    clock.at(1)
    first = meter.enter()
    clock.at(2)
    meter.leave(first)
    clock.at(7)
    second = meter.enter()
    clock.at(9)

    assert meter.leave(second) == 2.0
    clock.at(30)
    assert meter.busy_seconds == meter.billed_seconds == 3.0


def test_busy_time_counts_an_open_window_up_to_now_and_billed_time_only_closed_ones(
    clock: FakeClock, meter: DeviceMeter
) -> None:
    token = meter.enter()
    clock.at(4)

    assert meter.open_windows == 1
    assert meter.busy_seconds == 4.0
    assert meter.billed_seconds == 0.0
    assert meter.leave(token) == 4.0  # asking for the busy time changed no share
    assert meter.open_windows == 0


def test_a_window_is_left_once_and_only_by_its_own_meter(meter: DeviceMeter) -> None:
    token = meter.enter()
    meter.leave(token)

    with pytest.raises(KeyError):
        meter.leave(token)
    with pytest.raises(KeyError):
        DeviceMeter().leave(meter.enter())


def _processor_sharing(windows: list[tuple[int, int]]) -> list[Fraction]:
    """Each window's share, summed segment by segment between all the windows' endpoints."""
    points = sorted({t for window in windows for t in window})
    shares = [Fraction(0)] * len(windows)
    for begin, end in itertools.pairwise(points):
        covering = [i for i, (a, b) in enumerate(windows) if a <= begin and end <= b]
        for i in covering:
            shares[i] += Fraction(end - begin, len(covering))
    return shares


def _union_ns(windows: list[tuple[int, int]]) -> int:
    total, reached = 0, None
    for a, b in sorted(windows):
        if reached is None or a > reached:
            total, reached = total + b - a, b
        elif b > reached:
            total, reached = total + b - reached, b
    return total


_window = st.tuples(st.integers(0, 10**12), st.integers(0, 10**11)).map(
    lambda w: (w[0], w[0] + w[1])
)


@given(st.lists(_window, min_size=1, max_size=12))
def test_shares_of_any_windows_are_processor_sharing_and_sum_to_their_union(
    windows: list[tuple[int, int]],
) -> None:
    clock = FakeClock()
    meter = DeviceMeter(clock)
    # Every window's opening and closing in time order, openings first on a tie (an empty window
    # opens before it closes; between two windows a tie is no time at all).
    events = sorted(
        [(a, 0, i) for i, (a, _) in enumerate(windows)]
        + [(b, 1, i) for i, (_, b) in enumerate(windows)]
    )
    tokens: dict[int, int] = {}
    shares: dict[int, float] = {}

    for ns, is_close, i in events:
        clock.ns = ns
        if is_close:
            shares[i] = meter.leave(tokens[i])
        else:
            tokens[i] = meter.enter()

    expected = _processor_sharing(windows)
    assert [shares[i] for i in range(len(windows))] == [float(s / NS) for s in expected]
    assert sum(expected) == _union_ns(windows)
    assert meter.billed_seconds == meter.busy_seconds == _union_ns(windows) / NS
    assert meter.open_windows == 0


def test_threads_entering_and_leaving_at_once_keep_the_books_whole() -> None:
    meter = DeviceMeter()
    windows: list[tuple[float, float]] = []  # each thread's own reading: (wall, share)
    lock = threading.Lock()
    start = threading.Barrier(8)

    def work() -> None:
        start.wait(timeout=30)
        for _ in range(200):
            before = time.monotonic_ns()
            token = meter.enter()
            time.sleep(0)  # let another thread in mid-window
            share = meter.leave(token)
            with lock:
                windows.append(((time.monotonic_ns() - before) / NS, share))

    began = time.monotonic_ns()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    elapsed = (time.monotonic_ns() - began) / NS

    assert len(windows) == 8 * 200 and meter.open_windows == 0
    assert all(0 <= share <= wall for wall, share in windows)
    assert meter.billed_seconds == meter.busy_seconds <= elapsed
    assert sum(share for _, share in windows) == pytest.approx(meter.billed_seconds, rel=1e-9)

"""Progress of the tensor bytes a call moves: a callback of your own, or a ready-made bar.

The calls that move tensors (``run``, ``submit``, a handle's ``result``, ``upload_model``, on
``Client`` and ``AsyncClient`` alike) take ``progress``:

- ``None`` or ``False`` (the default): no report.
- a callable ``progress(direction, done_bytes, total_bytes)``: ``direction`` is ``"upload"``
  (inputs or a model file going to the broker) or ``"download"`` (a result coming back). Each
  transfer reports ``(direction, 0, total)`` first, then after every chunk, ``done`` growing to
  ``total``; a transfer that fails stops short of it. A retried ``submit`` or ``result``
  starts again from 0. ``run`` reports its upload, then its download. Called on the thread
  (or event loop) that drives the call: keep it quick.
- ``True``: a progress bar per transfer of at least ``BAR_MIN_BYTES``, drawn on stderr with
  ``rich`` (``pip install 'gpubroker[cli]'`` installs it).

Upload bytes count when gRPC takes them (its flow-control window, a few MiB at most, runs
ahead of the network); download bytes count as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

from gpubroker.protos.frames import chunk_field, read_chunk

if TYPE_CHECKING:
    from google.protobuf.message import Message
    from rich.progress import Progress as RichProgress

__all__ = [
    "BAR_MIN_BYTES",
    "Direction",
    "Progress",
    "ProgressBar",
    "ProgressCallback",
    "counted_upload",
    "progress_callback",
]

Direction: TypeAlias = Literal["upload", "download"]
"""Which way the bytes go: to the broker (``"upload"``) or from it (``"download"``)."""

ProgressCallback: TypeAlias = Callable[[Direction, int, int], None]
"""``callback(direction, done_bytes, total_bytes)``."""

Progress: TypeAlias = ProgressCallback | bool | None
"""What the ``progress`` argument of a call takes: a callback, ``True`` for a bar, or off."""

_M = TypeVar("_M", bound="Message")

BAR_MIN_BYTES = 4 << 20
"""The smallest transfer ``progress=True`` draws a bar for (4 MiB): below it a bar would
flash by."""


class ProgressBar:
    """A ``ProgressCallback`` that draws a ``rich`` bar on stderr for each transfer of at least
    ``min_bytes``, and removes nothing: the finished bar stays, with its size and rate.

    Raises:
        ImportError: ``rich`` is not installed.
    """

    def __init__(self, min_bytes: int = BAR_MIN_BYTES, label: str = "") -> None:
        import rich.progress  # noqa: F401 (fail now, not in the middle of a transfer)

        self._min_bytes = min_bytes
        self._label = label
        self._bar: RichProgress | None = None
        self._task: Any = None

    def __call__(self, direction: Direction, done: int, total: int) -> None:
        if total < self._min_bytes:
            return
        if self._bar is None or done == 0:
            self._start(direction, total)
        assert self._bar is not None
        self._bar.update(self._task, completed=done)
        if done >= total:
            self._bar.stop()
            self._bar = None

    def _start(self, direction: Direction, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        if self._bar is not None:
            self._bar.stop()
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        description = f"{self._label} {direction}".strip()
        self._task = self._bar.add_task(description, total=total)
        self._bar.start()


def progress_callback(progress: Progress) -> ProgressCallback | None:
    """The callback a call's ``progress`` argument stands for, or None for no report.

    Raises:
        TypeError: ``progress`` is neither a callable nor a bool nor None.
        ImportError: ``progress`` is True and ``rich`` is not installed.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        return ProgressBar()
    if not callable(progress):
        raise TypeError(f"progress must be a callable, True or None, not {progress!r}")
    return progress


def counted_upload(
    cls: type[_M],
    messages: Iterable[_M | bytes],
    total: int,
    report: ProgressCallback | None,
) -> Iterator[_M | bytes]:
    """Passes an upload's request stream through, reporting the chunk bytes gRPC has taken.

    ``messages`` is a stream of ``cls`` whose chunks come already serialised (``bytes``, see
    ``gpubroker.protos.frames``); ``total`` is the bytes its chunks carry in all.
    """
    if report is None:
        yield from messages
        return
    field = chunk_field(cls)
    done = 0
    report("upload", 0, total)
    for message in messages:
        yield message
        if isinstance(message, bytes) and field is not None:
            data = read_chunk(message, field)
            if data is not None and len(data):
                done += len(data)
                report("upload", done, total)

"""An attempt's outputs on their way in: checked against the limits and the declared headers,
then spooled (and kept in the row when small)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from gpubroker.broker.config import Limits
from gpubroker.broker.errors import InvalidTaskError, LimitExceededError, UploadCutShortError
from gpubroker.broker.model import AttemptOutcome
from gpubroker.broker.storage.spool import Spool
from gpubroker.protos.wire import TensorStream, WireError

__all__ = ["in_one_chunk", "spool_outputs"]


async def in_one_chunk(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as a stream of one chunk: outputs that came whole on the control stream."""
    yield data


async def spool_outputs(
    spool: Spool,
    limits: Limits,
    outcome: AttemptOutcome,
    chunks: AsyncIterator[bytes | memoryview],
    durable: bool,
) -> bytes | None:
    """Checks and stores the outputs; returns them when small enough to live in the row.

    Raises:
        LimitExceededError: a tensor or the whole is over the limits.
        UploadCutShortError: the stream ended early (the agent most likely died).
        InvalidTaskError: the bytes do not match their headers (size or checksum).
    """
    for meta in outcome.outputs:
        meta.validate(limits.max_tensor_bytes)
    total = sum(m.nbytes for m in outcome.outputs)
    if total > limits.max_task_bytes:
        raise LimitExceededError(
            f"outputs of {total} bytes exceed the limit of {limits.max_task_bytes} bytes"
        )
    writer = spool.write_outputs(
        outcome.attempt.task_id, outcome.attempt.number, total, durable=durable
    )
    stream = TensorStream(outcome.outputs)
    try:
        async for chunk in chunks:
            for _, _, piece in stream.feed(chunk):
                writer.write(piece)
        if stream.received_bytes < stream.expected_bytes:
            raise UploadCutShortError(
                f"result upload cut short after {stream.received_bytes} of "
                f"{stream.expected_bytes} declared bytes"
            )
        stream.finish()
        await writer.commit()
    except WireError as exc:  # a checksum or a tensor's size wrong: what the attempt sent
        writer.abort()
        raise InvalidTaskError(f"result upload rejected: {exc}") from exc
    except BaseException:
        writer.abort()
        raise
    return writer.inline

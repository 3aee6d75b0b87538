"""What a failed workload or model call tells its user: the exception, and where it happened.

The message goes back to a remote user who cannot see the agent's logs, so it has to carry the
useful part of a traceback, bounded in length. For an operator workload that is the last few
frames (``file:line in function``). For a user's model the frames are torch's, useless to the
user; what they need is the graph node that failed, which is found by running the graph again
node by node with ``torch.fx.Interpreter``, on the failure path only.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Collection, Sequence

import torch

__all__ = ["MAX_MESSAGE_CHARS", "describe_exception", "describe_model_failure", "failing_node"]

MAX_MESSAGE_CHARS = 2000
"""Longest error message reported for a failed workload or model call."""
_FRAMES = 4  # frames of an operator's traceback worth showing: the innermost ones


def describe_exception(
    exc: BaseException, skip_files: Collection[str] = (), frames: int = _FRAMES
) -> str:
    """``Type: message`` then the last ``frames`` frames of its traceback, bounded in length.

    Frames in ``skip_files`` (the agent's own, which called the workload) are left out.
    """
    lines = [_headline(exc)]
    stack = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename not in skip_files]
    for frame in stack[-frames:]:
        lines.append(f"  at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}")
    return _bounded("\n".join(lines))


def describe_model_failure(
    module: torch.nn.Module, inputs: Sequence[torch.Tensor], exc: BaseException
) -> str:
    """``Type: message`` of a failed model call, naming the graph node that raised it."""
    node = failing_node(module, inputs)
    where = f"at graph node {node}" if node is not None else "before any graph node ran"
    return _bounded(f"{_headline(exc)} ({where})")


def failing_node(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> str | None:
    """Reruns ``module``'s graph node by node on ``inputs``; names the node that raises.

    Returns ``"<name> (<target>)"``, e.g. ``"embedding (aten.embedding.default)"``, or None when
    the module is not a graph module or no node raised this time.
    """
    if not isinstance(module, torch.fx.GraphModule):
        return None
    interpreter = _Locator(module)
    try:
        with torch.no_grad():
            interpreter.run(*inputs)
    except Exception:
        failed = interpreter.current
        return None if failed is None else f"{failed.name} ({failed.target})"
    return None


class _Locator(torch.fx.Interpreter):
    current: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> object:
        self.current = n
        result = super().run_node(n)
        self.current = None
        return result


def _headline(exc: BaseException) -> str:
    # torch appends a long "While executing ..." block to errors raised inside fx graphs.
    message = str(exc).split("\n\nWhile executing", 1)[0].strip()
    return f"{type(exc).__name__}: {message}"


def _bounded(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 15] + " ... (trimmed)"

"""The exit codes of ``gpubroker``, defined once, and the mapping of failures onto them.

Every failure leaves in one line on stderr (``Error: ...``), never a traceback: click's own
usage errors exit 2, and a failed call to the broker exits with the code its kind maps to.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import click
import grpc

from gpubroker.client.errors import (
    AuthenticationError,
    DeadlineExceededError,
    GpuBrokerError,
    PermissionDeniedError,
    TaskCancelledError,
    TaskFailedError,
    UnavailableError,
    error_from_rpc,
)

__all__ = ["ExitCode", "RemoteError", "exit_codes_help", "remote_errors"]


class ExitCode(enum.IntEnum):
    """What a ``gpubroker`` command's exit status means."""

    OK = 0
    """It did what it was asked (``tasks wait``: the task succeeded)."""
    FAILED = 1
    """The task failed or was cancelled, the broker refused the request, or the command
    failed otherwise (a file it could not read, a database it could not open)."""
    USAGE = 2
    """A bad command line, option value or ``GPUBROKER_*`` variable; nothing was done."""
    UNAVAILABLE = 3
    """The broker could not be reached."""
    TIMEOUT = 4
    """A ``--timeout`` passed first (the task goes on)."""
    DENIED = 5
    """The API key is missing, wrong, or not allowed to do this."""


_MEANING = {
    ExitCode.OK: "ok",
    ExitCode.FAILED: "the task failed or was cancelled, the broker refused, or another error",
    ExitCode.USAGE: "usage error: a bad option, argument or GPUBROKER_* variable",
    ExitCode.UNAVAILABLE: "the broker could not be reached",
    ExitCode.TIMEOUT: "--timeout passed first",
    ExitCode.DENIED: "the API key is missing, wrong or not allowed",
}


def exit_codes_help() -> str:
    """The exit codes as a help paragraph (click keeps lines after ``\\b`` as they are)."""
    lines = [f"  {code.value}  {_MEANING[code]}" for code in ExitCode]
    return "\b\nExit codes:\n" + "\n".join(lines)


class RemoteError(click.ClickException):
    """A failed call, printed in one line with the exit code its kind maps to."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = int(code)  # type: ignore[misc]  # click's is a class attribute


def exit_code_for(error: GpuBrokerError) -> ExitCode:
    """The exit code a failed call maps to."""
    if isinstance(error, UnavailableError):
        return ExitCode.UNAVAILABLE
    if isinstance(error, DeadlineExceededError):
        return ExitCode.TIMEOUT
    if isinstance(error, AuthenticationError | PermissionDeniedError):
        return ExitCode.DENIED
    return ExitCode.FAILED


def _one_line(error: GpuBrokerError) -> str:
    """The error's first line (a remote traceback's frames follow it in ``details``)."""
    first = (error.details or "").strip().splitlines()
    text = first[0] if first else ""
    if isinstance(error, TaskFailedError | TaskCancelledError):
        return text or error.code.name
    return f"{error.code.name}: {text}" if text else error.code.name


@contextlib.contextmanager
def remote_errors() -> Iterator[None]:
    """Turns a failed call into a ``RemoteError``; a plain ``grpc.RpcError`` (a call made
    without the client SDK) likewise."""
    try:
        yield
    except GpuBrokerError as exc:
        raise RemoteError(_one_line(exc), exit_code_for(exc)) from exc
    except grpc.RpcError as exc:
        error = error_from_rpc(exc)
        raise RemoteError(_one_line(error), exit_code_for(error)) from exc

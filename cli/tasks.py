"""``gpubroker tasks`` and ``gpubroker models``: your tasks and models on a broker."""

from __future__ import annotations

import click

from gpubroker.cli.connection import Connection, connection_options
from gpubroker.cli.exits import ExitCode, RemoteError, remote_errors
from gpubroker.cli.output import (
    echo_json,
    json_option,
    model_dict,
    print_pairs,
    print_table,
    status_dict,
    when,
)
from gpubroker.client import TaskState, TaskStatus

__all__ = ["models", "tasks"]

_STATES = [state.name for state in TaskState]


@click.group()
def tasks() -> None:
    """Your tasks: list them, show one, cancel or wait for them."""


@tasks.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(_STATES, case_sensitive=False),
    help="Only tasks in this state (repeat for several) [default: all].",
)
@click.option("--limit", type=click.IntRange(min=1), default=100, help="Most tasks to list.")
@json_option
@connection_options
def tasks_list(states: tuple[str, ...], limit: int, as_json: bool, connection: Connection) -> None:
    """Lists your tasks, newest first."""
    wanted = [TaskState[name.upper()] for name in states] or None
    with remote_errors(), connection.client() as client:
        found = client.list_tasks(wanted, limit)
    if as_json:
        echo_json([status_dict(s) for s in found])
        return
    print_table(
        ("TASK", "WORKLOAD", "STATE", "ATTEMPT", "CREATED (UTC)", "GPU", "COMPUTE S", "ERROR"),
        (_task_row(s) for s in found),
    )


def _task_row(status: TaskStatus) -> tuple[object, ...]:
    return (
        status.task_id,
        status.workload,
        status.state.name,
        status.attempt,
        when(status.created_at),
        status.gpu_type,
        f"{status.compute_seconds:.3f}",
        status.error_code,
    )


@tasks.command("show")
@click.argument("task_id")
@json_option
@connection_options
def tasks_show(task_id: str, as_json: bool, connection: Connection) -> None:
    """Shows one task's status."""
    with remote_errors(), connection.client() as client:
        status = client.task(task_id).status()
    _print_status(status, as_json)


def _print_status(status: TaskStatus, as_json: bool) -> None:
    if as_json:
        echo_json(status_dict(status))
        return
    shapes = ", ".join(f"{m.dtype}{list(m.shape)}" for m in status.outputs)
    print_pairs(
        [
            ("task", status.task_id),
            ("workload", status.workload),
            ("state", status.state.name),
            ("queue position", status.queue_position),
            ("waiting for", status.waiting_for),
            ("tenant", status.tenant),
            ("attempt", status.attempt),
            ("priority", status.priority),
            ("created", when(status.created_at)),
            ("started", when(status.started_at)),
            ("finished", when(status.finished_at)),
            ("deadline", when(status.deadline)),
            ("gpu", status.gpu_type),
            ("requires", str(status.requires)),
            ("compute s", status.compute_seconds),
            ("inputs", ", ".join(f"{m.dtype}{list(m.shape)}" for m in status.inputs)),
            ("outputs", shapes),
            ("error", f"{status.error_code}: {status.error_message}" if status.error_code else ""),
        ]
    )


@tasks.command("cancel")
@click.argument("task_ids", metavar="TASK_ID...", nargs=-1, required=True)
@json_option
@connection_options
def tasks_cancel(task_ids: tuple[str, ...], as_json: bool, connection: Connection) -> None:
    """Cancels tasks still queued or running; prints each one's state after."""
    with remote_errors(), connection.client() as client:
        done = [client.task(task_id).cancel() for task_id in task_ids]
    if as_json:
        echo_json([status_dict(s) for s in done])
        return
    print_table(("TASK", "STATE"), ((s.task_id, s.state.name) for s in done))


@tasks.command("wait")
@click.argument("task_id")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Give up after this many seconds (exit 4; the task goes on) [default: none].",
)
@json_option
@connection_options
def tasks_wait(task_id: str, timeout: float | None, as_json: bool, connection: Connection) -> None:
    """Waits for a task to finish, telling each change (queue position, state) on stderr.

    Exits 0 if it succeeded and 1 if it failed or was cancelled; prints its final status.
    """
    final: TaskStatus | None = None
    with remote_errors(), connection.client() as client:
        for status in client.watch(task_id, timeout):
            final = status
            click.echo(_change(status), err=True)
        if final is None:
            final = client.task(task_id).status()
    _print_status(final, as_json)
    if final.state is not TaskState.SUCCEEDED:
        raise RemoteError(f"task {task_id} {final.state.name.lower()}", ExitCode.FAILED)


def _change(status: TaskStatus) -> str:
    """One line for a status change."""
    text = f"{status.task_id}: {status.state.name}"
    if status.state is TaskState.QUEUED and status.queue_position:
        text += f", position {status.queue_position} in the queue"
    if status.waiting_for:
        text += f" ({status.waiting_for})"
    return text


@click.group()
def models() -> None:
    """Your uploaded models (upload them with the SDK's ``upload_model``)."""


@models.command("list")
@json_option
@connection_options
def models_list(as_json: bool, connection: Connection) -> None:
    """Lists your models, newest first."""
    with remote_errors(), connection.client() as client:
        found = client.models()
    if as_json:
        echo_json([model_dict(m) for m in found])
        return
    print_table(
        ("MODEL", "NAME", "MIB", "INPUTS", "GPU", "CREATED (UTC)"),
        (
            (
                m.model_id,
                m.name,
                f"{m.size_bytes / 2**20:.1f}",
                len(m.inputs),
                str(m.requires),
                when(m.created_at),
            )
            for m in found
        ),
    )


@models.command("delete")
@click.argument("model_id")
@json_option
@connection_options
def models_delete(model_id: str, as_json: bool, connection: Connection) -> None:
    """Deletes one of your models by its id; prints it as it was."""
    with remote_errors(), connection.client() as client:
        gone = client.delete_model(model_id)
    if as_json:
        echo_json(model_dict(gone))
        return
    click.echo(f"deleted model {gone.model_id} ({gone.name})")

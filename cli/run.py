"""``gpubroker run WORKLOAD INPUT... -o OUTPUT``: one task on tensor files, with progress bars."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from gpubroker.cli.connection import Connection, connection_options
from gpubroker.cli.exits import remote_errors
from gpubroker.cli.output import echo_json, json_option, print_pairs
from gpubroker.cli.tensorfiles import (
    TensorFileError,
    check_output_paths,
    read_inputs,
    write_outputs,
)
from gpubroker.client import TaskResult
from gpubroker.client.codec import OutputKind, is_torch
from gpubroker.client.progress import BAR_MIN_BYTES, ProgressBar

__all__ = ["parse_param", "run"]


def parse_param(text: str) -> tuple[str, int | float | bool | str]:
    """``KEY=VALUE``, the value taken as a bool (``true``/``false``), an int, a float, or else
    a string.

    Raises:
        click.BadParameter: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint="--param")
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    return key, raw


def _params(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    return dict(parse_param(v) for v in values)


def _bar(progress: bool | None) -> ProgressBar | None:
    """Bars on stderr: for every transfer with ``--progress``; by default for transfers of at
    least ``BAR_MIN_BYTES`` when stderr is a terminal."""
    if progress is None:
        return ProgressBar(BAR_MIN_BYTES) if sys.stderr.isatty() else None
    return ProgressBar(0) if progress else None


@click.command()
@click.argument("workload")
@click.argument(
    "inputs",
    metavar="INPUT...",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "-o",
    "--output",
    "outputs",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the outputs go: one .npy file per output, in order, or one .safetensors file "
    "for all of them.",
)
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_params,
    help="A workload parameter (repeat for several): true/false, an integer, a number or text.",
)
@click.option("--priority", type=click.IntRange(-100, 100), default=0, help="Among your tasks.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds the task may take, queue included (exit 4 past it) [default: none].",
)
@click.option("--gpu", help="The GPU type it must run on, e.g. nvidia-l4 [default: any].")
@click.option(
    "--min-gpu-memory", metavar="SIZE", help="Least device memory, e.g. 16GiB [default: any]."
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr for the upload and the download "
    "[default: on a terminal, for transfers of 4 MiB or more].",
)
@json_option
@connection_options
def run(
    workload: str,
    inputs: tuple[Path, ...],
    outputs: tuple[Path, ...],
    params: dict[str, Any],
    priority: int,
    timeout: float | None,
    gpu: str | None,
    min_gpu_memory: str | None,
    progress: bool | None,
    as_json: bool,
    connection: Connection,
) -> None:
    """Runs WORKLOAD on the tensors in the INPUT files and writes its outputs with -o.

    Each .npy INPUT is one input tensor; a .safetensors INPUT gives all its tensors, in the
    natural order of their names (x2 before x10). Outputs are numpy arrays, torch tensors
    where numpy has no dtype (bfloat16).
    """
    try:
        check_output_paths(outputs)
        tensors = read_inputs(inputs)
    except TensorFileError as exc:
        raise click.UsageError(str(exc)) from exc
    output: OutputKind = "torch" if any(is_torch(t) for t in tensors) else "numpy"
    try:
        with remote_errors(), connection.client() as client:
            result = client.run(
                workload,
                tensors,
                priority=priority,
                timeout=timeout,
                output=output,
                gpu=gpu,
                min_gpu_memory=min_gpu_memory,
                progress=_bar(progress),
                **params,
            )
    except (TypeError, ValueError) as exc:  # a parameter or size the client refused
        raise click.UsageError(str(exc)) from exc
    names = [meta.name for meta in result.status.outputs]
    try:
        write_outputs(result.outputs, names, outputs)
    except TensorFileError as exc:
        raise click.ClickException(str(exc)) from exc
    _report(result, outputs, as_json)


def _report(result: TaskResult, paths: tuple[Path, ...], as_json: bool) -> None:
    status = result.status
    shapes = [{"dtype": m.dtype, "shape": list(m.shape)} for m in status.outputs]
    if as_json:
        echo_json(
            {
                "task_id": result.task_id,
                "state": status.state.name,
                "gpu_type": status.gpu_type,
                "compute_seconds": status.compute_seconds,
                "outputs": shapes,
                "files": [str(p) for p in paths],
            }
        )
        return
    print_pairs(
        [
            ("task", result.task_id),
            ("gpu", status.gpu_type),
            ("compute s", f"{status.compute_seconds:.3f}"),
            ("outputs", ", ".join(f"{s['dtype']}{s['shape']}" for s in shapes)),
            ("written", ", ".join(str(p) for p in paths)),
        ]
    )

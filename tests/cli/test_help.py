"""``gpubroker``'s surface: ``-h`` and ``--version`` on every command, env vars and defaults in
the help, and bad values refused in one line without a traceback."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gpubroker.cli.app import COMMANDS, gpubroker, package_version
from gpubroker.cli.exits import ExitCode

SOURCES = {
    "serve": ("gpubroker.broker.config", "gpubroker.broker.__main__", "gpubroker.logformat"),
    "agent": ("gpubroker.gpu_agent.config", "gpubroker.gpu_agent.__main__", "gpubroker.logformat"),
}
"""The modules that read the environment variables each command's help names."""


def _walk(
    command: click.Command, path: tuple[str, ...], ctx: click.Context
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            yield from _walk(sub, (*path, name), ctx)


def every_command() -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command and group under ``gpubroker``, the group itself first."""
    with click.Context(gpubroker) as ctx:
        return list(_walk(gpubroker, (), ctx))


PATHS = [path for path, _ in every_command()]


def test_every_listed_command_is_there() -> None:
    top = {path[0] for path in PATHS if path}

    assert top == set(COMMANDS)
    for expected in [("tasks", "wait"), ("models", "delete"), ("billing", "budget", "set")]:
        assert expected in PATHS
    assert {("admin", "tenant"), ("admin", "key")} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "gpubroker")
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_on_every_command(path: tuple[str, ...], flag: str) -> None:
    done = CliRunner().invoke(gpubroker, [*path, flag], prog_name="gpubroker")

    assert done.exit_code == 0, done.output
    assert done.output.startswith(f"Usage: gpubroker {' '.join(path)}".rstrip())
    assert "--version" in done.output


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "gpubroker")
def test_version_on_every_command(path: tuple[str, ...]) -> None:
    done = CliRunner().invoke(gpubroker, [*path, "--version"], prog_name="gpubroker")

    assert done.exit_code == 0, done.output
    assert done.output == f"gpubroker {package_version()}\n"
    assert package_version() != "unknown"


def test_the_group_help_documents_every_exit_code() -> None:
    done = CliRunner().invoke(gpubroker, ["-h"])

    for code in ExitCode:
        assert f"  {code.value}  " in done.output


@pytest.mark.parametrize("name", ["serve", "agent"])
def test_every_option_of_the_processes_names_its_variable_and_that_variable_is_read(
    name: str,
) -> None:
    (command,) = [c for p, c in every_command() if p == (name,)]
    source = "".join(inspect.getsource(sys.modules[m]) for m in SOURCES[name])
    ctx = click.Context(command, info_name=name)
    prefix = "GPUBROKER_AGENT_" if name == "agent" else "GPUBROKER_"
    without = {"port_file", "log_level", "version", "metadata_url"}

    for param in command.get_params(ctx):
        if not isinstance(param, click.Option) or param.name in without:
            continue
        if param is command.get_help_option(ctx):
            continue
        record = param.get_help_record(ctx)
        assert record is not None, param.name
        help_text = " ".join(record[1].split())
        named = re.findall(r"GPUBROKER_[A-Z_]*[A-Z]", help_text)
        assert named, f"--{param.name} names no environment variable: {help_text}"
        for variable in named:
            short = variable.removeprefix(prefix)  # the agent's are read by their suffix
            assert re.search(rf'["}}]({short}|{variable})"', source), (param.name, variable)


def test_client_options_show_their_variables_and_defaults() -> None:
    done = CliRunner().invoke(gpubroker, ["tasks", "list", "-h"], terminal_width=200)

    assert "GPUBROKER_ADDRESS" in done.output
    assert "default: localhost:50051" in done.output
    assert "GPUBROKER_API_KEY" in done.output
    assert "default: 100" in done.output  # --limit


def _gpubroker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpubroker.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["serve"], {"GPUBROKER_HEARTBEAT_S": "often"}, "GPUBROKER_HEARTBEAT_S"),
        (["serve"], {"GPUBROKER_MAX_TENSOR_BYTES": "1e9x"}, "GPUBROKER_MAX_TENSOR_BYTES"),
        (["serve", "--log-level", "LOUD"], {}, "--log-level"),
        (["agent", "--log-level", "LOUD"], {}, "--log-level"),
        (["agent"], {"GPUBROKER_AGENT_SLOTS": "two"}, "GPUBROKER_AGENT_SLOTS"),
        (["tasks", "list", "--limit", "0"], {}, "--limit"),
        (["tasks", "list", "--state", "sleeping"], {}, "--state"),
        (["run", "add", "missing.npy", "-o", "out.npy"], {}, "missing.npy"),
        (["billing", "report", "--since", "yesterday"], {}, "ISO 8601"),
    ],
)
def test_a_bad_value_is_named_in_one_line_and_exits_2(
    args: list[str], env: dict[str, str], named: str
) -> None:
    done = _gpubroker(*args, env={"GPUBROKER_DATA_DIR": "/nonexistent/gpubroker", **env})

    assert done.returncode == ExitCode.USAGE, done.stderr
    assert named in _one_error_line(done.stderr)
    assert done.stdout == ""


@pytest.mark.slow
def test_an_unreachable_broker_exits_3_in_one_line() -> None:
    done = _gpubroker("tasks", "list", "--broker", "127.0.0.1:9", "--json")

    assert done.returncode == ExitCode.UNAVAILABLE
    assert "UNAVAILABLE" in _one_error_line(done.stderr)


@pytest.mark.slow
def test_the_console_script_is_the_group() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "gpubroker")

    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0
    assert done.stdout == f"gpubroker {package_version()}\n"


def test_billing_reports_take_json_as_well_as_format_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    runner = CliRunner()

    migrated = runner.invoke(gpubroker, ["migrate", "--database-url", url])
    flag = runner.invoke(gpubroker, ["billing", "report", "--database-url", url, "--json"])
    fmt = runner.invoke(gpubroker, ["billing", "report", "--database-url", url, "--format", "json"])

    assert migrated.exit_code == 0, migrated.output
    assert flag.exit_code == 0, flag.output
    assert json.loads(flag.output) == json.loads(fmt.output)
    assert json.loads(flag.output)["groups"] == []


def test_h_works_even_after_the_original_command_printed_its_help() -> None:
    # click caches a command's help option the first time it is used: a copy made afterwards
    # must still build its own, with -h.
    from gpubroker.broker.__main__ import main as serve

    assert CliRunner().invoke(serve, ["--help"]).exit_code == 0
    done = CliRunner().invoke(gpubroker, ["serve", "-h"], prog_name="gpubroker")
    assert done.exit_code == 0, done.output

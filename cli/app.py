"""The ``gpubroker`` command group: each subcommand is loaded when it is first used.

The processes' own commands (the broker's, the agent's, billing's, the admin and certificate
tools) are served as they are, through copies that add ``--version`` and name their
environment variables in their help; the client commands live in this package.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import click

from gpubroker.cli.envdoc import AGENT_ENV, BILLING_ENV, SERVE_ENV, EnvDoc, documented
from gpubroker.cli.exits import exit_codes_help

__all__ = ["COMMANDS", "LazyGroup", "adopt", "gpubroker", "package_version"]

CONTEXT_SETTINGS: dict[str, object] = {
    "help_option_names": ["-h", "--help"],
    "show_default": True,
    "max_content_width": 100,
}
"""Every subcommand inherits these: ``-h``, and defaults shown in help."""


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from an uninstalled tree)."""
    try:
        return version("gpubroker")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Entry:
    """A subcommand: where its command object lives, and a one-line summary for the list."""

    target: str
    """``module:attribute`` of the click command."""
    summary: str
    env: Mapping[str, EnvDoc] = field(default_factory=dict)
    """Environment variables its options are read from without click's knowing."""


COMMANDS: dict[str, Entry] = {
    "serve": Entry("gpubroker.broker.__main__:main", "Run the broker.", SERVE_ENV),
    "agent": Entry("gpubroker.gpu_agent.__main__:main", "Run a GPU agent.", AGENT_ENV),
    "status": Entry("gpubroker.cli.status:status", "Show the queue, agents, machines, spend."),
    "tasks": Entry("gpubroker.cli.tasks:tasks", "List, show, cancel or wait for tasks."),
    "models": Entry("gpubroker.cli.tasks:models", "List or delete your uploaded models."),
    "run": Entry("gpubroker.cli.run:run", "Run a workload on tensor files (.npy, .safetensors)."),
    "billing": Entry("gpubroker.billing.__main__:cli", "Usage reports and budgets.", BILLING_ENV),
    "admin": Entry("gpubroker.broker.admin:cli", "Tenants and API keys."),
    "certs": Entry("gpubroker.broker.certs:main", "Make development TLS certificates."),
    "migrate": Entry(
        "gpubroker.billing.__main__:migrate", "Upgrade the database schema.", BILLING_ENV
    ),
}
"""The subcommands of ``gpubroker``, in the order ``--help`` lists them."""


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"gpubroker {package_version()}")
    ctx.exit()


def version_option() -> click.Option:
    """``--version``: print the package version and exit."""
    return click.Option(
        ["--version"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_print_version,
        help="Show the version and exit.",
    )


def adopt(command: click.Command, env: Mapping[str, EnvDoc]) -> click.Command:
    """A copy of ``command`` (and of its subcommands) with ``--version`` and its options'
    environment variables in their help; the original is left as it was."""
    adopted = copy.copy(command)
    adopted._help_option = None  # click caches it on first use: the copy's is built anew, with -h
    params = [documented(p, env) for p in command.params if p.name != "version"]
    adopted.params = [*params, *_json_flag(adopted, params), version_option()]
    adopted.context_settings = {**command.context_settings, **CONTEXT_SETTINGS}
    if isinstance(command, click.Group) and isinstance(adopted, click.Group):
        adopted.commands = {name: adopt(sub, env) for name, sub in command.commands.items()}
    return adopted


def _json_flag(adopted: click.Command, params: list[click.Parameter]) -> list[click.Option]:
    """``--json`` for a command with ``--format`` json (billing's reports): it sets that."""
    formats = [p for p in params if p.name == "fmt" and isinstance(p.type, click.Choice)]
    if not formats or "json" not in formats[0].type.choices or adopted.callback is None:  # type: ignore[attr-defined]
        return []
    original = adopted.callback

    def callback(*args: Any, as_json: bool, **kwargs: Any) -> Any:
        if as_json:
            kwargs["fmt"] = "json"
        return original(*args, **kwargs)

    adopted.callback = callback
    flag = "Print JSON on stdout (the same as --format json)."
    return [click.Option(["--json", "as_json"], is_flag=True, help=flag)]


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (the agent's loads torch)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, _, attribute = entry.target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        return adopt(command, entry.env)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, entry.summary) for name, entry in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings=CONTEXT_SETTINGS,
    epilog=exit_codes_help(),
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
def gpubroker() -> None:
    """Queue PyTorch work on remote GPUs through a broker, and operate that broker.

    Client commands (status, tasks, models, run) reach a broker at --broker with --api-key;
    the others run a process (serve, agent) or work on the broker's database (billing, admin,
    migrate). `gpubroker COMMAND -h` tells more.
    """

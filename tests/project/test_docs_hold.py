"""The docs name only what exists: every ``make`` target, command and flag of ours in README.md
and docs/*.md resolves against the Makefile and the real click commands.

Each command line in a fenced block or an inline code span is read: ``make TARGET``,
``gpubroker ...``, ``gpubroker-agent ...``, ``python -m gpubroker.<module> ...`` and
``python -m bench[.cost] ...``. Its subcommands must exist, and every ``--flag`` on it must be an
option of the command it reached (or of a group above it). An inline span that is a flag alone
(``--model-dir``) must be an option of one of our commands. Other tools' lines (gcloud, docker,
pip, grpcurl) are not ours and are skipped.
"""

from __future__ import annotations

import importlib
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from gpubroker.cli.app import gpubroker

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MODULES = {
    "gpubroker.broker": "gpubroker.broker.__main__:main",
    "gpubroker.gpu_agent": "gpubroker.gpu_agent.__main__:main",
    "gpubroker.billing": "gpubroker.billing.__main__:cli",
    "gpubroker.broker.admin": "gpubroker.broker.admin:cli",
    "gpubroker.broker.certs": "gpubroker.broker.certs:main",
    "gpubroker.cli": "gpubroker.cli.app:gpubroker",
    "bench": "bench.__main__:main",
    "bench.cost": "bench.cost.__main__:main",
}
"""``python -m`` targets of ours, and their click commands."""

OTHER_TOOLS_FLAGS = {"--index-url"}
"""Flags named alone in prose that belong to other tools (pip's, in docs/deploy.md)."""


def _load(target: str) -> click.Command:
    module, _, name = target.partition(":")
    command = getattr(importlib.import_module(module), name)
    assert isinstance(command, click.Command), target
    return command


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, flags=re.MULTILINE))


def _snippets(text: str) -> Iterator[str]:
    """Command-line candidates: each logical line of a fenced block, and each inline span."""
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            yield line.strip().removeprefix("$ ")
    without_blocks = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    yield from re.findall(r"`([^`\n]+)`", without_blocks)


def _tokens(snippet: str) -> list[str]:
    try:
        tokens = shlex.split(snippet, comments=True)
    except ValueError:
        tokens = snippet.split()
    for stop in ("|", "&&", ";", "||", ">", "2>&1"):
        if stop in tokens:
            tokens = tokens[: tokens.index(stop)]
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # VAR=value before the command
    return tokens


def _ours(tokens: list[str]) -> tuple[click.Command, list[str], str] | None:
    """The click command a line invokes and the words after it, or None if it is not ours."""
    if not tokens:
        return None
    head = tokens[0].rsplit("/", 1)[-1]
    if head == "gpubroker":
        return gpubroker, tokens[1:], "gpubroker"
    if head == "gpubroker-agent":
        return _load(MODULES["gpubroker.gpu_agent"]), tokens[1:], "gpubroker-agent"
    if re.fullmatch(r"python3?(\.\d+)?", head) and tokens[1:2] == ["-m"] and len(tokens) > 2:
        target = MODULES.get(tokens[2])
        if target is not None:
            return _load(target), tokens[3:], f"python -m {tokens[2]}"
    return None


def _options(command: click.Command) -> set[str]:
    return {name for param in command.params for name in param.opts + param.secondary_opts}


def _resolve(command: click.Command, words: list[str], shown: str) -> list[str]:
    """Problems with one invocation: unknown subcommands or flags."""
    problems: list[str] = []
    known = _options(command)
    ctx = click.Context(command, info_name=shown)
    for word in words:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            if flag not in known:
                problems.append(f"{shown}: no option {flag}")
        elif isinstance(command, click.Group) and "|" in word:  # `tasks list|show|cancel`
            missing = [w for w in word.split("|") if command.get_command(ctx, w) is None]
            problems += [f"{shown}: no subcommand {w!r}" for w in missing]
            return problems
        elif isinstance(command, click.Group) and not word.startswith("-"):
            sub = command.get_command(ctx, word)
            if sub is None:
                if not re.fullmatch(r"[A-Z_]+|<.*>|\.\.\.|\[.*\]", word):  # a placeholder
                    problems.append(f"{shown}: no subcommand {word!r}")
                return problems
            shown, command = f"{shown} {word}", sub
            ctx = click.Context(command, info_name=word, parent=ctx)
            known |= _options(command)
    return problems


def _all_options() -> set[str]:
    found: set[str] = set()

    def walk(command: click.Command, ctx: click.Context) -> None:
        found.update(_options(command))
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None:
                    walk(sub, click.Context(sub, info_name=name, parent=ctx))

    for target in MODULES.values():
        command = _load(target)
        walk(command, click.Context(command))
    return found


def _problems(path: Path, targets: set[str], options: set[str]) -> list[str]:
    problems = []
    for snippet in _snippets(path.read_text()):
        tokens = _tokens(snippet)
        if not tokens:
            continue
        if tokens[0] == "make" and len(tokens) > 1:
            problems += [f"make: no target {t}" for t in tokens[1:2] if t not in targets]
            continue
        if re.fullmatch(r"--[a-z][a-z0-9-]*(=\S*)?", snippet.strip()):
            flag = snippet.strip().split("=", 1)[0]
            if flag not in options | OTHER_TOOLS_FLAGS:
                problems.append(f"no command of ours has {flag}")
            continue
        invoked = _ours(tokens)
        if invoked is not None:
            problems += _resolve(*invoked)
    return [f"{path.name}: {p}" for p in problems]


@pytest.fixture(scope="module")
def options() -> set[str]:
    return _all_options()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_make_target_command_and_flag_the_docs_name_exists(
    path: Path, options: set[str]
) -> None:
    assert _problems(path, _make_targets(), options) == []


def test_the_checker_catches_what_does_not_exist(tmp_path: Path, options: set[str]) -> None:
    doc = tmp_path / "bad.md"
    doc.write_text(
        "Run `make nope`, then `gpubroker tasks frobnicate`, `gpubroker serve --no-such-flag`,\n"
        "and `--nor-this`.\n\n```\n$ gpubroker run add a.npy -o out.npy --also-not\n```\n"
    )
    assert _problems(doc, _make_targets(), options) == [
        "bad.md: gpubroker run: no option --also-not",
        "bad.md: make: no target nope",
        "bad.md: gpubroker tasks: no subcommand 'frobnicate'",
        "bad.md: gpubroker serve: no option --no-such-flag",
        "bad.md: no command of ours has --nor-this",
    ]

"""Nothing from the network is ever unpickled or executed: workloads are named and registered.

The scan reads the syntax tree of every module of the four packages and fails on anything that
deserialises to code (pickle and its relatives, ``torch.load``, ``numpy.load(allow_pickle=True)``,
unsafe YAML) or runs strings (``eval``, ``exec``, ``compile``, ``__import__``). An obviously
safe use goes in ``ALLOWED`` with the reason beside it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpubroker.broker.api.convert import status_for
from gpubroker.broker.config import Limits
from gpubroker.broker.core.tasks import check_spec
from gpubroker.broker.errors import UnknownWorkloadError
from gpubroker.broker.model import TaskSpec
from gpubroker.gpu_agent.attempt import ERROR_CODES
from gpubroker.gpu_agent.errors import UnknownWorkloadError as AgentUnknownWorkloadError
from gpubroker.gpu_agent.workloads import lookup, registry
from gpubroker.protos.states import FailureCode
from tests.support.paths import REPO_ROOT as ROOT

PACKAGES = ("broker", "gpu_agent", "client", "billing", "protos")

UNSAFE_MODULES = frozenset(
    {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "jsonpickle", "joblib", "marshal"}
    | {"shelve", "copyreg", "pickletools", "torch.package"}
)
"""Modules whose only business is turning bytes back into arbitrary objects."""

UNSAFE_CALLS = frozenset(
    {"eval", "exec", "compile", "__import__", "torch.load", "torch.jit.load", "torch.hub.load"}
    | {"pandas.read_pickle", "pd.read_pickle", "yaml.load", "yaml.unsafe_load", "yaml.full_load"}
)
"""Calls that run code or unpickle whatever they are given."""

NUMPY_LOADS = frozenset({"numpy.load", "np.load"})
"""Safe by default; unsafe with ``allow_pickle=True``."""

ALLOWED: dict[tuple[str, str], str] = {}
"""``(path, name)`` -> why this use never sees network data. Empty: there are none today."""


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _allows_pickle(call: ast.Call) -> bool:
    return any(
        kw.arg == "allow_pickle"
        and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)
        for kw in call.keywords
    )


def _is_unsafe_module(name: str) -> bool:
    return name in UNSAFE_MODULES or name.split(".")[0] in UNSAFE_MODULES


def _imported(node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if _is_unsafe_module(alias.name))
        return
    module = node.module or ""
    if _is_unsafe_module(module):
        yield module
    for alias in node.names:
        if f"{module}.{alias.name}" in UNSAFE_CALLS | UNSAFE_MODULES:
            yield f"{module}.{alias.name}"


def _called(node: ast.Call) -> Iterator[str]:
    name = _dotted(node.func)
    if name in UNSAFE_CALLS or (name in NUMPY_LOADS and _allows_pickle(node)):
        yield name


def unsafe_uses(source: str) -> Iterator[tuple[int, str]]:
    """Yields ``(line, name)`` for every unsafe import or call in a module's source."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield from ((node.lineno, name) for name in _imported(node))
        elif isinstance(node, ast.Call):
            yield from ((node.lineno, name) for name in _called(node))


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_scan_covers_every_package() -> None:
    scanned = {p.relative_to(ROOT).parts[0] for p in _modules()}

    assert scanned == set(PACKAGES)


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import pickle", "pickle"),
        ("import dill as d", "dill"),
        ("from pickle import loads", "pickle"),
        ("from torch import load", "torch.load"),
        ("torch.load(buf)", "torch.load"),
        ("np.load(f, allow_pickle=True)", "np.load"),
        ("numpy.load(f, allow_pickle=flag)", "numpy.load"),
        ("eval(text)", "eval"),
        ("exec(code)", "exec"),
        ("yaml.load(text)", "yaml.load"),
        ("marshal_ok = 1\nimport marshal", "marshal"),
    ],
)
def test_the_scan_finds_unsafe_uses(source: str, found: str) -> None:
    assert [name for _, name in unsafe_uses(source)] == [found]


@pytest.mark.parametrize(
    "source",
    [
        "np.load(f)",
        "np.load(f, allow_pickle=False)",
        "torch.frombuffer(buf, dtype=torch.uint8)",
        "model.eval()",
        "re.compile(r'x')",
        "# pickle is never used\nx = 'pickle'",
    ],
)
def test_the_scan_leaves_safe_code_alone(source: str) -> None:
    assert list(unsafe_uses(source)) == []


def test_no_module_unpickles_or_executes_anything() -> None:
    found = [
        f"{path}:{line}: {name}"
        for module in _modules()
        for path in [module.relative_to(ROOT).as_posix()]
        for line, name in unsafe_uses(module.read_text())
        if (path, name) not in ALLOWED
    ]

    assert found == []


def test_an_unknown_workload_is_refused_by_the_broker_as_invalid_argument() -> None:
    spec = TaskSpec(workload="__import__('os').system('id')", inputs=())

    with pytest.raises(UnknownWorkloadError) as excinfo:
        check_spec(spec, Limits(), frozenset({"echo", "matmul"}))

    assert status_for(excinfo.value).name == "INVALID_ARGUMENT"
    assert "known: echo, matmul" in str(excinfo.value)


def test_an_agent_runs_only_registered_workloads() -> None:
    with pytest.raises(AgentUnknownWorkloadError) as excinfo:
        lookup("pickle.loads")

    assert "echo" in registry()
    assert ERROR_CODES[type(excinfo.value)] is FailureCode.INVALID_ARGUMENT

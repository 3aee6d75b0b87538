"""Reading settings from environment variables, shared by every process's ``Settings.from_env``.

It lives beside the five packages rather than in one of them because the broker, the agent and
billing may each import only what their own layer allows, and this imports nothing at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

__all__ = ["default_data_dir", "env_flag", "env_float", "env_int"]

_N = TypeVar("_N", int, float)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_flag(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    """The boolean variable ``name``: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/
    ``off`` in any case; ``default`` when unset or empty.

    Raises:
        ValueError: any other value; the message names the variable.
    """
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in _TRUE | _FALSE:
        raise ValueError(f"{name} must be true or false, got {environ[name]!r}")
    return raw in _TRUE


def env_float(environ: Mapping[str, str], name: str, default: float | str) -> float:
    """The number in variable ``name``; ``default`` when unset.

    Raises:
        ValueError: it is not a number; the message names the variable.
    """
    return _env_number(environ, name, default, float, "a number")


def env_int(environ: Mapping[str, str], name: str, default: int | str) -> int:
    """The integer in variable ``name``; ``default`` when unset.

    Raises:
        ValueError: it is not an integer; the message names the variable.
    """
    return _env_number(environ, name, default, int, "an integer")


def _env_number(
    environ: Mapping[str, str],
    name: str,
    default: _N | str,
    kind: Callable[[str | _N], _N],
    what: str,
) -> _N:
    raw = environ.get(name)
    if raw is None:
        return kind(default)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {raw!r}") from None


def default_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the broker keeps its database and spool, and where billing reads them, unless
    told: ``GPUBROKER_DATA_DIR``, else ``$XDG_DATA_HOME/gpubroker``, else
    ``~/.local/share/gpubroker`` (always absolute)."""
    if explicit := environ.get("GPUBROKER_DATA_DIR"):
        return Path(explicit).expanduser().absolute()
    xdg = environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "gpubroker"

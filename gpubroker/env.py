"""Reading settings from environment variables, shared by every process's ``Settings.from_env``.

It lives beside the five packages rather than in one of them because the broker, the agent and
billing may each import only what their own layer allows, and this imports nothing at all.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["env_flag"]

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

"""The workload names agents have advertised: what a submitted task may name."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["KnownWorkloads"]


class KnownWorkloads:
    """Every workload name any agent has advertised, in this broker's life or an earlier one.

    Loaded from the store when the dispatcher starts and grown as agents connect; the task
    service refuses a task that names none of them (none known yet: any name is taken).
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._names = frozenset(names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    @property
    def names(self) -> frozenset[str]:
        """The names known now."""
        return self._names

    def add(self, names: Iterable[str]) -> None:
        """Adds names (already remembered in the store)."""
        self._names |= frozenset(names)

"""What a caller may see: a tenant sees its own share of the broker, an operator all of it.

Every API key has a role. ``tenant`` (the default) runs tasks and reads its own tasks, models,
queue and spend. ``operator`` is also a tenant (it runs tasks under its tenant name) and may
read the whole broker's status: every tenant's queue, the agents, the machines and the spend
(``GetStatus``, the status page). Stored keys get theirs from ``key create --operator``;
settings keys from ``--api-keys KEY=TENANT:operator``. In open mode (no keys anywhere) the
single caller, tenant ``default``, is an operator: whoever can reach an open broker owns it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Caller", "Role", "parse_role", "settings_caller"]


class Role(enum.StrEnum):
    """An API key's role."""

    TENANT = "tenant"
    """Its own tasks, models, queue and spend."""
    OPERATOR = "operator"
    """Also the status of the whole broker."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the tenant its key names and the key's role."""

    tenant: str
    role: Role = Role.TENANT

    @property
    def is_operator(self) -> bool:
        """True when the caller may see the whole broker."""
        return self.role is Role.OPERATOR


def parse_role(text: str) -> Role:
    """The role named ``text``; raises ``ValueError`` naming the choices for anything else."""
    try:
        return Role(text)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise ValueError(f"unknown role {text!r}; choose one of {choices}") from None


def settings_caller(value: str) -> Caller:
    """The caller a settings key names: ``TENANT`` or ``TENANT:ROLE`` (``--api-keys``).

    Raises:
        ValueError: the role is not one of ``Role``'s, or the tenant is empty.
    """
    tenant, sep, role = value.partition(":")
    if not tenant:
        raise ValueError(f"API key entry {value!r} names no tenant")
    return Caller(tenant, parse_role(role) if sep else Role.TENANT)

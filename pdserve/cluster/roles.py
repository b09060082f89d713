"""The worker roles by name: the one place that knows every role (the worker runtime knows none)."""

from __future__ import annotations

from pdserve.common.roles import WorkerRole
from pdserve.decode.role import DecodeRole
from pdserve.prefill.role import PrefillRole
from pdserve.worker.role import Role

ROLES = tuple(role.value for role in WorkerRole)


def make_role(role: str) -> Role:
    """A fresh role object for a worker of ``role``."""
    if role == "prefill":
        return PrefillRole()
    if role in ("decode", "colocated"):
        return DecodeRole(role)
    raise ValueError(f"unknown worker role {role!r}; expected one of {', '.join(ROLES)}")

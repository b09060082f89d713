"""The serving modes and worker roles: one enumeration each, used by the config loader, the launcher,
the router, the workers, the SDK and the CLI. Pure: no torch."""

from __future__ import annotations

from enum import StrEnum


class ServingMode(StrEnum):
    """How the pools are laid out: separate prefill/decode pools, or workers that do both phases."""

    DISAGGREGATED = "disaggregated"
    COLOCATED = "colocated"

    @property
    def stream_roles(self) -> tuple[WorkerRole, ...]:
        """The roles a request's tokens stream from in this mode. A disaggregated cluster may also hold
        colocated workers (switched to that role while serving): they prefill every prompt they get."""
        if self is ServingMode.DISAGGREGATED:
            return (WorkerRole.DECODE, WorkerRole.COLOCATED)
        return (WorkerRole.COLOCATED,)


class WorkerRole(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"

    @property
    def streams_tokens(self) -> bool:
        """Whether the router submits requests to, and reads ``Worker.Updates`` from, such workers."""
        return self is not WorkerRole.PREFILL

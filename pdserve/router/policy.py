"""The shape every routing policy shares: filter -> score in [0, 1] -> pick the maximum.

A policy sees :class:`~pdserve.router.registry.WorkerState` objects (synthetic ones in tests), never
channels or requests. ``filter`` drops workers that cannot take a request (unhealthy, stream down,
excluded after failing this request); ``score`` rates the rest relative to each other; ``pick``
takes the highest score and breaks ties round-robin, so an idle cluster spreads requests evenly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence

from pdserve.router.errors import NoWorkerAvailableError
from pdserve.router.registry import WorkerState

TIE_TOLERANCE = 1e-9


class ScoredPolicy(ABC):
    """Base class of the decode and prefill policies. Not thread-safe (the router is single-loop)."""

    role_label: str = "worker"
    """Used in the UNAVAILABLE message: "no healthy <role_label> worker"."""

    def __init__(self) -> None:
        self._round_robin = 0

    def filter(self, candidates: Sequence[WorkerState], exclude: Collection[str] = ()) -> list[WorkerState]:
        return [c for c in candidates if c.routable and c.worker_id not in exclude]

    @abstractmethod
    def score(self, candidates: Sequence[WorkerState]) -> list[float]:
        """One score in [0, 1] per candidate (higher is better), relative to the other candidates."""

    def pick(self, candidates: Sequence[WorkerState], exclude: Collection[str] = (),
             bonus: Mapping[str, float] | None = None) -> WorkerState:
        """The best eligible worker; raises :class:`NoWorkerAvailableError` explaining why none is.

        ``bonus`` adds a per-request term to a worker's score (prefix affinity: the share of the
        prompt it has probably cached, times its weight)."""
        eligible = self.filter(candidates, exclude)
        if not eligible:
            raise NoWorkerAvailableError(self._explain_none(candidates, exclude))
        scores = self.score(eligible)
        if bonus:
            scores = [s + bonus.get(c.worker_id, 0.0) for c, s in zip(eligible, scores, strict=True)]
        best = max(scores)
        tied = [c for c, s in zip(eligible, scores) if s >= best - TIE_TOLERANCE]
        choice = tied[self._round_robin % len(tied)]
        self._round_robin += 1
        return choice

    def _explain_none(self, candidates: Sequence[WorkerState], exclude: Collection[str]) -> str:
        if not candidates:
            return f"no {self.role_label} worker is configured"
        reasons = []
        for c in candidates:
            if c.worker_id in exclude:
                why = "failed this request already"
            elif not c.healthy:
                why = f"unhealthy ({c.last_error or 'not described yet'})"
            else:
                why = "its Updates stream is down"
            reasons.append(f"{c.worker_id} at {c.endpoint.address}: {why}")
        return f"no healthy {self.role_label} worker available: " + "; ".join(reasons)


def relative(values: Sequence[float]) -> list[float]:
    """Scale non-negative values into [0, 1] by the largest one (all zeros stay zeros)."""
    top = max(values, default=0.0)
    return [v / top if top > 0 else 0.0 for v in values]

"""Admission control: refuse at once, with a time to retry, what cannot start in time.

Before a request enters the in-flight table the router estimates its time to first token from what the
workers report with every step (queued prompt tokens and the prefill rate each one sustains) and what
the router itself queued on them (see :mod:`pdserve.router.prefill_policy`):

* disaggregated: the best of every routable prefill worker (queue plus this prompt at its full rate)
  and every routable decode worker prefilling it itself (at the spare rate its step budget leaves);
* colocated: the best colocated worker, the same way.

If that estimate exceeds the request's limit, the smaller of ``router.admission_max_ttft_s`` and the
time the client has left (its gRPC deadline), the request is refused with RESOURCE_EXHAUSTED (HTTP
429) carrying ``retry_after_s``: how long until the queue ahead of it has drained enough. A worker that
has not reported a rate yet makes no estimate, and the request is admitted: admission control never
refuses on missing data. ``router.max_inflight_requests`` stays the hard bound on what the router holds
(memory), refused the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc

from pdserve.router.config import ServingMode, WorkerRole
from pdserve.router.errors import RouteError
from pdserve.router.prefill_policy import expected_ttft_local, expected_ttft_remote
from pdserve.router.registry import WorkerRegistry, WorkerState

#: Bounds of the Retry-After a refusal carries (seconds).
MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0


class AdmissionRejectedError(RouteError):
    """The request would not see its first token within its limit (RESOURCE_EXHAUSTED, retry later)."""

    def __init__(self, expected_s: float, limit_s: float, retry_after_s: float) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the cluster is overloaded: the expected time to first token is {expected_s:.2f} s, "
                         f"over this request's limit of {limit_s:.2f} s; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class AdmissionControl:
    def __init__(self, registry: WorkerRegistry, mode: ServingMode, max_ttft_s: float | None) -> None:
        self._registry = registry
        self._mode = mode
        self._max_ttft_s = max_ttft_s
        self.num_rejected = 0

    def expected_ttft_s(self, num_prompt_tokens: int) -> float:
        """Seconds to this prompt's first token on the best worker (``inf`` when no rate is known)."""
        best = math.inf
        if self._mode is ServingMode.DISAGGREGATED:
            prefill = _routable(self._registry.with_role(WorkerRole.PREFILL))
            best = min((expected_ttft_remote(w, num_prompt_tokens) for w in prefill), default=math.inf)
        decoders = _routable(self._registry.with_role(*self._mode.stream_roles))
        return min([best, *(expected_ttft_local(w, num_prompt_tokens) for w in decoders)])

    def check(self, num_prompt_tokens: int, client_deadline_s: float | None) -> None:
        """Raise :class:`AdmissionRejectedError` if the prompt cannot start in time (see the module)."""
        limits = [x for x in (self._max_ttft_s, client_deadline_s) if x is not None]
        if not limits:
            return
        limit = min(limits)
        expected = self.expected_ttft_s(num_prompt_tokens)
        if expected == math.inf or expected <= limit:
            return
        self.num_rejected += 1
        retry_after = min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, math.ceil(expected - limit)))
        raise AdmissionRejectedError(expected, limit, retry_after)


def _routable(workers: Sequence[WorkerState]) -> list[WorkerState]:
    return [w for w in workers if w.routable]

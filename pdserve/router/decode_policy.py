"""Choosing the decode (or colocated) worker of a request: the least loaded one.

The load of a decode worker has two parts, weighted by ``RouterConfig.kv_usage_weight`` and
``running_requests_weight``: how full its KV cache is (``kv_usage`` of its latest ``StepUpdate``) and
how many requests it carries. The request count is ``max(running + waiting, assigned)``: the worker's
own count includes other routers' requests, while this router's ``assigned`` count already includes
requests submitted since the latest load report (a burst would otherwise all land on one worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.common.validation import require_float
from pdserve.router.policy import ScoredPolicy, relative
from pdserve.router.registry import WorkerState


@dataclass(frozen=True)
class DecodePolicyConfig:
    kv_usage_weight: float = 0.5
    running_requests_weight: float = 0.5

    def __post_init__(self) -> None:
        require_float("kv_usage_weight", self.kv_usage_weight, minimum=0.0)
        require_float("running_requests_weight", self.running_requests_weight, minimum=0.0)


class DecodePolicy(ScoredPolicy):
    """Base class of decode-worker policies (a subclass only implements ``score``)."""

    role_label = "decode"


class LeastLoadedDecodePolicy(DecodePolicy):
    """score = 1 - (w_kv * kv_usage + w_req * requests / max_requests) / (w_kv + w_req)."""

    def __init__(self, config: DecodePolicyConfig | None = None) -> None:
        super().__init__()
        self.config = config or DecodePolicyConfig()
        total = self.config.kv_usage_weight + self.config.running_requests_weight
        self._w_kv = self.config.kv_usage_weight / total if total > 0 else 0.5
        self._w_req = self.config.running_requests_weight / total if total > 0 else 0.5

    @staticmethod
    def num_requests(worker: WorkerState) -> int:
        load = worker.load
        return max(load.running_requests + load.waiting_requests, worker.assigned_requests)

    def score(self, candidates: Sequence[WorkerState]) -> list[float]:
        requests = relative([float(self.num_requests(c)) for c in candidates])
        return [1.0 - (self._w_kv * c.load.kv_usage + self._w_req * r) for c, r in zip(candidates, requests)]

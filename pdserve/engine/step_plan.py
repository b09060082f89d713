"""What one engine step computes: the scheduler's plan (its prompt chunks and decodes, the requests it
preempted, the landing zones it opened), as the runner, the roles and the step-time model read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from pdserve.engine.request import Request
from pdserve.engine.step_time import StepShape


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens ``[start, start + num_tokens)`` of ``request`` with KV in ``block_ids``.

    ``samples`` (fixed when scheduled): the chunk reaches the request's last known token, so the step
    samples a new token from its last row.
    """

    request: Request
    start: int
    num_tokens: int
    block_ids: list[int]
    samples: bool

    @classmethod
    def of(cls, request: Request, num_tokens: int, block_ids: list[int]) -> ScheduledChunk:
        start = request.num_computed_tokens
        return cls(request, start, num_tokens, block_ids, start + num_tokens == request.num_tokens)


@dataclass
class SchedulerPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    landing_zones: list[Request] = field(default_factory=list)  # newly WAITING_FOR_KV requests
    predicted_s: float = 0.0  # what the step-time model predicts it takes (with a step budget; else 0)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @cached_property
    def shape(self) -> StepShape:
        """What the step carries, in the step-time model's terms: computed once, when first read (by the
        scheduler once the plan is complete, for its predicted time, then by the step-time monitor)."""
        tokens = kv_tokens = decodes = 0
        pairs = context_pairs = 0.0
        for chunk in self.chunks:
            n, start = chunk.num_tokens, chunk.start
            tokens += n
            kv_tokens += start
            if n == 1:
                decodes += 1
            else:
                pairs += n * n / 2
                context_pairs += n * start
        return StepShape(tokens, kv_tokens, pairs, decodes, context_pairs)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

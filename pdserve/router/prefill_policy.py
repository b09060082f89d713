"""Choosing the prefill worker of a request, and whether to prefill remotely at all.

Prefill workers send no ``Updates`` stream to the router, so the router accounts their queues itself:
when it assigns a request it adds the prompt's length (token count, or ``len(text) / 4`` when only text
is known) to that worker's ``queued_prefill_tokens``, and subtracts it when the request's first delta
arrives (the prefill is done) or the request ends. :class:`LeastQueuedPrefillPolicy` picks the worker
with the fewest queued tokens.

:meth:`PrefillPolicy.should_prefill_remotely` decides whether a prompt goes to the prefill pool at all:
a prompt for which it returns False is prefilled on the decode worker (``SubmitRequest.prefill_address``
left empty). :class:`LeastQueuedPrefillPolicy` keeps short prompts local (the KV transfer would cost
more than it hides) and, optionally, prompts that arrive while every prefill worker is backed up
(conditional disaggregation: the overflow is prefilled where it would otherwise queue).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pdserve.common.validation import require_int
from pdserve.router.policy import ScoredPolicy, relative
from pdserve.router.registry import WorkerState

CHARS_PER_TOKEN_ESTIMATE = 4


def estimate_prompt_tokens(*, num_token_ids: int | None, text: str | None) -> int:
    """The prompt's token count, or ``ceil(len(text) / 4)`` (at least 1) when only text is known."""
    if num_token_ids is not None:
        return num_token_ids
    return max(1, math.ceil(len(text or "") / CHARS_PER_TOKEN_ESTIMATE))


class PrefillPolicy(ScoredPolicy):
    """Base class of prefill-worker policies. Default hook: every prompt is prefilled remotely."""

    role_label = "prefill"

    def should_prefill_remotely(self, num_prompt_tokens: int,
                                prefill_workers: Sequence[WorkerState] = ()) -> bool:
        return True


class LeastQueuedPrefillPolicy(PrefillPolicy):
    """score = 1 - queued_prefill_tokens / max(queued_prefill_tokens).

    Prompts shorter than ``min_remote_prompt_tokens`` are prefilled on the decode worker (0: none
    is); so are prompts that arrive while every prefill worker has at least
    ``max_queued_prefill_tokens`` tokens queued (0: never)."""

    def __init__(self, min_remote_prompt_tokens: int = 0, max_queued_prefill_tokens: int = 0) -> None:
        super().__init__()
        self.min_remote_prompt_tokens = require_int("min_remote_prompt_tokens", min_remote_prompt_tokens, minimum=0)
        self.max_queued_prefill_tokens = require_int("max_queued_prefill_tokens", max_queued_prefill_tokens,
                                                     minimum=0)

    def should_prefill_remotely(self, num_prompt_tokens: int,
                                prefill_workers: Sequence[WorkerState] = ()) -> bool:
        if num_prompt_tokens < self.min_remote_prompt_tokens:
            return False
        if self.max_queued_prefill_tokens and prefill_workers:
            return min(w.queued_prefill_tokens for w in prefill_workers) < self.max_queued_prefill_tokens
        return True

    def score(self, candidates: Sequence[WorkerState]) -> list[float]:
        return [1.0 - q for q in relative([float(c.queued_prefill_tokens) for c in candidates])]

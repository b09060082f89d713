"""Choosing the prefill worker of a request, and whether to prefill remotely at all.

Prefill workers send no ``Updates`` stream to the router, so the router accounts their queues itself:
when it assigns a request it adds the prompt's length (token count, or ``len(text) / 4`` when only text
is known) to that worker's ``queued_prefill_tokens``, and subtracts it when the request's first delta
arrives (the prefill is done) or the request ends. :class:`LeastQueuedPrefillPolicy` picks the worker
with the fewest queued tokens.

:meth:`PrefillPolicy.should_prefill_remotely` decides whether a prompt goes to the prefill pool at all:
a prompt for which it returns False is prefilled on the decode worker (``SubmitRequest.prefill_address``
left empty). :class:`LeastQueuedPrefillPolicy` keeps short prompts local (the KV transfer would cost
more than it hides) and, with a TTFT SLO, compares expected times to first token: a prompt goes to the
prefill pool when the best prefill worker still meets the SLO (queued tokens plus this prompt over its
measured prefill rate) or beats its decode worker; otherwise the decode worker prefills it, in chunks
its step-time budget allows (the rate it reports with every step) -- the decode worker of all eligible ones
that would finish it soonest (:meth:`PrefillPolicy.local_prefill_worker`), not only the decode policy's
pick (short prompts and the queue-length rule keep the pick). Without an SLO (or rates), the
older rule applies: prompts that arrive while every prefill worker has ``max_queued_prefill_tokens``
queued stay local (conditional disaggregation).
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

    def should_prefill_remotely(self, num_prompt_tokens: int, prefill_workers: Sequence[WorkerState] = (),
                                decode_worker: WorkerState | None = None) -> bool:
        return True

    def local_prefill_worker(self, num_prompt_tokens: int, prefill_workers: Sequence[WorkerState],
                             decode_worker: WorkerState, decode_workers: Sequence[WorkerState]) -> WorkerState | None:
        """Where the prompt is prefilled: None for the prefill pool, else the decode worker that computes it
        itself -- ``decode_worker`` (the decode policy's pick) unless a rule that weighs every eligible one of
        ``decode_workers`` chose another. Default: :meth:`should_prefill_remotely` with the pick."""
        return None if self.should_prefill_remotely(num_prompt_tokens, prefill_workers, decode_worker) else decode_worker


def expected_ttft_remote(worker: WorkerState, num_prompt_tokens: int) -> float:
    """Seconds until a prefill worker would finish this prompt: its queue and the prompt at its rate."""
    rate = worker.full_prefill_tokens_per_s
    return (worker.queued_prefill_tokens + num_prompt_tokens) / rate if rate > 0 else math.inf


def expected_ttft_local(worker: WorkerState, num_prompt_tokens: int) -> float:
    """Seconds until a decode worker would finish this prompt itself, at the spare rate its step budget
    leaves (its own report of queued prompt tokens, or this router's, whichever is larger)."""
    rate = worker.load.prefill_tokens_per_s
    queued = max(worker.queued_prefill_tokens, worker.load.queued_prefill_tokens)
    return (queued + num_prompt_tokens) / rate if rate > 0 else math.inf


class LeastQueuedPrefillPolicy(PrefillPolicy):
    """score = 1 - queued_prefill_tokens / max(queued_prefill_tokens).

    Prompts shorter than ``min_remote_prompt_tokens`` are prefilled on the decode worker (0: none
    is). With ``ttft_slo_s`` and measured rates, a prompt stays local when the prefill pool would miss
    the SLO and the decode worker would be faster; without them, prompts that arrive while every
    prefill worker has at least ``max_queued_prefill_tokens`` tokens queued stay local (0: never)."""

    def __init__(self, min_remote_prompt_tokens: int = 0, max_queued_prefill_tokens: int = 0,
                 ttft_slo_s: float | None = None) -> None:
        super().__init__()
        self.min_remote_prompt_tokens = require_int("min_remote_prompt_tokens", min_remote_prompt_tokens, minimum=0)
        self.max_queued_prefill_tokens = require_int("max_queued_prefill_tokens", max_queued_prefill_tokens,
                                                     minimum=0)
        self.ttft_slo_s = ttft_slo_s
        self.num_spilled = 0  # prompts kept on their decode worker because the prefill pool would be late

    def should_prefill_remotely(self, num_prompt_tokens: int, prefill_workers: Sequence[WorkerState] = (),
                                decode_worker: WorkerState | None = None) -> bool:
        if decode_worker is None:
            return num_prompt_tokens >= self.min_remote_prompt_tokens and self._remote_by_queue(prefill_workers)
        return self.local_prefill_worker(num_prompt_tokens, prefill_workers, decode_worker, [decode_worker]) is None

    def local_prefill_worker(self, num_prompt_tokens: int, prefill_workers: Sequence[WorkerState],
                             decode_worker: WorkerState, decode_workers: Sequence[WorkerState]) -> WorkerState | None:
        """Short prompts stay on ``decode_worker``. With a TTFT SLO and measured rates, a prompt the prefill
        pool would answer late stays on the eligible decode worker that would finish it itself soonest
        (``decode_worker`` unless another is strictly sooner), when that one beats the pool; the pool takes
        the rest. Without them, the queue-length rule decides, with ``decode_worker``."""
        if num_prompt_tokens < self.min_remote_prompt_tokens:
            return decode_worker
        if self.ttft_slo_s is not None and prefill_workers:
            remote = min(expected_ttft_remote(w, num_prompt_tokens) for w in prefill_workers)
            if remote < math.inf:
                if remote <= self.ttft_slo_s:
                    return None
                local = min([decode_worker, *decode_workers], key=lambda w: expected_ttft_local(w, num_prompt_tokens))
                if remote <= expected_ttft_local(local, num_prompt_tokens):
                    return None
                self.num_spilled += 1
                return local
        return None if self._remote_by_queue(prefill_workers) else decode_worker

    def _remote_by_queue(self, prefill_workers: Sequence[WorkerState]) -> bool:
        """The rule without an SLO: remote unless every prefill worker has ``max_queued_prefill_tokens`` queued."""
        if self.max_queued_prefill_tokens and prefill_workers:
            return min(w.queued_prefill_tokens for w in prefill_workers) < self.max_queued_prefill_tokens
        return True

    def score(self, candidates: Sequence[WorkerState]) -> list[float]:
        return [1.0 - q for q in relative([float(c.queued_prefill_tokens) for c in candidates])]

"""The request record that flows through every stage of the engine.

A request is scheduled purely in token counts: it holds ``num_tokens`` known tokens (prompt plus
output so far) of which ``num_computed_tokens`` already have KV in the cache. Prefill, chunked
prefill, decode, recompute after preemption and KV received from another worker are all the same
thing: computing the tokens in ``[num_computed_tokens, num_tokens)``.

With asynchronous scheduling a step's sampled token is known on the device before the host reads it:
``num_pending_tokens`` counts it in ``num_tokens`` already, so the next step can be scheduled and
computed from the device copy, while ``all_token_ids`` holds only the tokens the host has. It is at
most 1 while a step is scheduled, and 2 between launching a step and reading the one before it.
``pending_is_last`` marks a pending token that ends the request whatever it is (``max_tokens``, the
model length, a prefill-only request's first token): nothing more is scheduled for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum

from pdserve.common.outputs import FinishReason, TokenLogprobs
from pdserve.common.sampling_params import SamplingParams


class RequestStatus(IntEnum):
    """Ordered: ``status > RUNNING`` means it holds no blocks; ``>= FINISHED_STOPPED`` means finished."""

    WAITING = 0
    WAITING_FOR_KV = 1  # blocks allocated, KV arriving from a prefill worker
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at first admission
    num_preemptions: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    error_code: str | None = None  # gRPC status code name of ``error`` (None: INTERNAL)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks known so far
    remote_prefill: bool = False  # decode role: the prompt's KV arrives from a prefill worker
    prefill_only: bool = False  # prefill role: finish after the first token, keep the blocks until sent
    num_pending_tokens: int = 0  # sampled by a step in flight, not yet appended (see the module docstring)
    deadline_missed: bool = False  # the scheduler predicted this prompt cannot meet its TTFT SLO
    first_token_time: float | None = None  # time.monotonic() when its first output token was appended
    pending_is_last: bool = False
    _all_token_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._all_token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens. Read-only by convention: use :meth:`append_output_token`."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        """Known tokens plus the one a step in flight is sampling (if any)."""
        return len(self._all_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens the host holds (``len(all_token_ids)``)."""
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return 0 if self.pending_is_last else self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def expect_token(self, ends_request: bool) -> None:
        """A step now in flight samples this request's next token (``ends_request``: it is the last)."""
        assert self.num_pending_tokens < 2, f"{self.request_id} has two tokens in flight already"
        self.num_pending_tokens += 1
        self.pending_is_last = ends_request

    def token_landed(self) -> None:
        """The host now has the oldest pending token (append it next), or its row was dropped."""
        assert self.num_pending_tokens > 0, f"{self.request_id} has no token in flight"
        self.num_pending_tokens -= 1
        if not self.num_pending_tokens:
            self.pending_is_last = False

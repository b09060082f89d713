"""What a request returns: the generated token ids, text, finish reason and optional logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    """Why generation ended. ``str`` values match the OpenAI API's ``finish_reason``."""

    STOP = "stop"  # end-of-sequence token, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached, or the model's context is full
    ABORT = "abort"  # cancelled by the client or the operator
    ERROR = "error"  # the request failed; ``RequestOutput.error`` says why


@dataclass(frozen=True)
class Logprob:
    """The log-probability of one token at one position, and its rank (1 = most likely)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


TokenLogprobs = dict[int, Logprob]
"""For one generated position: token id -> Logprob, holding the sampled token and the top-n."""


@dataclass
class RequestOutput:
    """The state of one request as of its latest step; cumulative, not a delta.

    ``token_ids``/``text`` hold everything generated so far; a streaming consumer takes the suffix past
    what it already sent. ``finished`` is set exactly once, together with ``finish_reason``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it, if any
    logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class RequestDelta:
    """What one engine step added to one request: the unit streamed to clients.

    ``new_text`` is the text that became final in this step (a partial stop string or an incomplete
    UTF-8 character is held back until resolved). Exactly one delta per request has ``finished`` set.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str = ""
    new_logprobs: list[TokenLogprobs] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    error_code: str | None = None  # gRPC status code name for ``error`` (None: INTERNAL)

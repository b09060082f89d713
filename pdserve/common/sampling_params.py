"""Sampling parameters of one request: validated once, on construction, then immutable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from pdserve.common.errors import InvalidParameterError
from pdserve.common.validation import require_float, require_int

MAX_LOGPROBS = 20
"""The most top-n logprobs one request may ask for per generated token."""
MAX_REPETITION_PENALTY = 1e6
"""The largest repetition penalty: far past any useful one, and the float32 logits it scales stay finite
(a penalty past float32's range became inf and turned the logits into NaN)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop.

    Semantics follow vLLM's parameters of the same names:

    * ``temperature == 0`` is greedy decoding; ``top_k``/``top_p``/``min_p`` are then ignored.
    * ``top_k`` of 0 or -1 disables top-k; ``top_p == 1`` and ``min_p == 0`` disable theirs.
    * ``repetition_penalty`` divides positive (multiplies negative) logits of every token already in
      the prompt or the output; ``frequency_penalty`` subtracts ``count`` times itself and
      ``presence_penalty`` subtracts itself once, for tokens already in the output.
    * ``seed`` gives the request its own random stream: the same seed yields the same tokens whatever
      other requests share the batch.
    * Generation stops at ``max_tokens``, at the model's end-of-sequence token (unless ``ignore_eos``),
      at any of ``stop_token_ids``, or when the text contains one of ``stop`` (the stop string is cut
      from the text unless ``include_stop_str_in_output``). EOS and stop tokens are not generated before
      ``min_tokens``.
    * ``logprobs=n`` returns, for each generated token, its log-probability and the top ``n``
      alternatives (``0``: the sampled token's only), computed from the model's raw logits.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        require_int("max_tokens", self.max_tokens, minimum=1)
        require_int("min_tokens", self.min_tokens, minimum=0, maximum=self.max_tokens)
        require_float("temperature", self.temperature, minimum=0.0)
        require_int("top_k", self.top_k, minimum=-1)
        require_float("top_p", self.top_p, minimum=0.0, maximum=1.0, exclusive_minimum=True)
        require_float("min_p", self.min_p, minimum=0.0, maximum=1.0)
        require_float("repetition_penalty", self.repetition_penalty, minimum=0.0, maximum=MAX_REPETITION_PENALTY,
                      exclusive_minimum=True)
        require_float("frequency_penalty", self.frequency_penalty, minimum=-2.0, maximum=2.0)
        require_float("presence_penalty", self.presence_penalty, minimum=-2.0, maximum=2.0)
        if self.seed is not None:
            require_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        object.__setattr__(self, "stop", _as_stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _as_token_ids(self.stop_token_ids))
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.logprobs is not None:
            require_int("logprobs", self.logprobs, minimum=0, maximum=MAX_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling reads the tokens generated so far (repetition/frequency/presence)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def max_stop_string_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (tuples become lists); ``SamplingParams(**d)`` rebuilds it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _as_stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence):
        raise InvalidParameterError("stop", f"must be a string or a list of strings, got {stop!r}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidParameterError("stop", f"each stop string must be a non-empty string, got {s!r}")
    return tuple(stop)


def _as_token_ids(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, Sequence) or isinstance(ids, str):
        raise InvalidParameterError("stop_token_ids", f"must be a list of integers, got {ids!r}")
    for t in ids:
        require_int("stop_token_ids", t, minimum=0)
    return tuple(ids)

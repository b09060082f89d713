"""Incremental detokenization of one request's output, for streaming, with stop strings.

Decoding a growing id list from scratch after every token costs O(n) per token and, worse, the text of
a prefix is not always a prefix of the text: a character split across byte-level tokens decodes to
U+FFFD until its last byte arrives, and some decoders (SentencePiece's leading-space handling) treat
the first token of a sequence differently. The prefix-offset / read-offset technique avoids both:

* ``read_offset`` is the index of the first token whose text has not been accepted yet;
  ``prefix_offset`` is a few tokens earlier, where the previous accepted window started;
* each step decodes ``ids[prefix_offset:read_offset]`` (the *prefix text*) and
  ``ids[prefix_offset:]`` (the *window text*); when the window text is longer and does not end in
  an incomplete character (U+FFFD), the new text is ``window_text[len(prefix_text):]``, and the
  offsets move to ``prefix_offset = read_offset, read_offset = len(ids)``; otherwise nothing is
  accepted yet and the tokens are retried with the next ones.

The id list starts with the last few prompt tokens (the *seed*), so the first output token is decoded
in context (its leading space is kept as it would be in the full text).

Cost per token is O(window), where the window is the tokens since the previous accepted step plus
the ones before it; it stays a handful of tokens in practice. A window that keeps ending in U+FFFD
(the model emitting invalid UTF-8 bytes) is force-accepted once it holds :data:`MAX_PENDING_TOKENS`
unread tokens, so the cost stays bounded even then.

Contract (tested): for byte-level tokenizers, if no stop string is hit, the concatenation of every
:meth:`IncrementalDetokenizer.take_delta` result, the last one with ``finished=True``, equals
``tokenizer.decode(output_ids)``, and no delta holds a U+FFFD that the full decode does not. (For
SentencePiece-style tokenizers the one difference is that the streamed text keeps the first output
token's leading space, which a decode of the output ids alone would strip.)
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.common.errors import InvalidParameterError
from pdserve.engine.tokenizer import Tokenizer

PROMPT_SEED_TOKENS = 5
"""How many trailing prompt tokens give the first output token its decoding context."""

MAX_PENDING_TOKENS = 32
"""Unread tokens after which text ending in U+FFFD is accepted anyway (only invalid UTF-8 gets here)."""

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output token ids into text as they arrive, and watches for stop strings.

    Usage: after each engine step call :meth:`push` with the new ids; if it returns a stop string the
    request is finished. Stream :meth:`take_delta` results to the client; call
    ``take_delta(finished=True)`` once at the end for the remainder. Not thread-safe.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        """Prepare to detokenize the output of a prompt of ``prompt_token_ids``.

        ``stop`` strings end the output when they appear in its text (never matched against the
        prompt); they must be non-empty. ``include_stop_str_in_output`` keeps the matched stop string
        at the end of :attr:`text`.
        """
        if isinstance(stop, str):
            raise InvalidParameterError("stop", "must be a sequence of strings, not a single string")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError("stop", f"stop strings must be non-empty strings, got {s!r}")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stop), default=0)

        seed = list(prompt_token_ids[-PROMPT_SEED_TOKENS:]) if PROMPT_SEED_TOKENS else []
        self._ids: list[int] = seed
        self._prefix_offset = 0
        self._read_offset = len(seed)
        self._prefix_text = self._decode(0, len(seed))
        if self._prefix_text.endswith(_REPLACEMENT):  # the prompt ends mid-character: no usable context
            self._ids, self._read_offset, self._prefix_text = [], 0, ""

        self._text = ""
        self._num_output_tokens = 0
        self._returned = 0  # characters of _text already handed out by take_delta
        self._stop_hit: str | None = None
        self._flushed = False

    # ------------------------------------------------------------------ public API

    @property
    def text(self) -> str:
        """The whole output text so far (truncated at a stop string once one is hit)."""
        return self._text

    @property
    def num_output_tokens(self) -> int:
        """How many output token ids have been pushed."""
        return self._num_output_tokens

    @property
    def stop_hit(self) -> str | None:
        """The stop string that ended the output, or ``None``."""
        return self._stop_hit

    def push(self, token_ids: Sequence[int]) -> str | None:
        """Append newly generated ``token_ids`` and update :attr:`text`.

        Returns the stop string if :attr:`text` now contains one (the earliest match; it is truncated
        right before it, or right after it with ``include_stop_str_in_output``), else ``None``. Only
        the last ``max stop length - 1`` old characters plus the new text are searched.

        Raises ``RuntimeError`` if called after a stop string was returned or after
        ``take_delta(finished=True)``.
        """
        if self._stop_hit is not None:
            raise RuntimeError(
                f"IncrementalDetokenizer.push called after stop string {self._stop_hit!r} ended the output"
            )
        if self._flushed:
            raise RuntimeError("IncrementalDetokenizer.push called after take_delta(finished=True)")
        old_len = len(self._text)
        pieces: list[str] = []
        for token_id in token_ids:
            self._ids.append(int(token_id))
            pieces.append(self._step())
        self._num_output_tokens += len(token_ids)
        self._text += "".join(pieces)
        return self._check_stop(old_len)

    def take_delta(self, finished: bool) -> str:
        """The part of :attr:`text` not yet returned by this method.

        While not ``finished`` (and no stop string was hit), the last ``max stop length - 1``
        characters are held back, so a partial stop string is never streamed. With ``finished=True``
        everything is returned, including the text of trailing tokens that never completed a
        character (as U+FFFD); no further :meth:`push` is allowed after that.
        """
        if finished and not self._flushed:
            self._flush()
        end = len(self._text)
        if not finished and self._stop_hit is None and self._max_stop_len > 1:
            end -= self._max_stop_len - 1
        if end <= self._returned:
            return ""
        delta = self._text[self._returned:end]
        self._returned = end
        return delta

    # ------------------------------------------------------------------ internals

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _step(self) -> str:
        """Try to accept the unread tokens; return the newly accepted text ('' if none yet)."""
        window_text = self._decode(self._prefix_offset, len(self._ids))
        pending = len(self._ids) - self._read_offset
        complete = len(window_text) > len(self._prefix_text) and not window_text.endswith(_REPLACEMENT)
        if not complete and pending < MAX_PENDING_TOKENS:
            return ""
        new_text = window_text[len(self._prefix_text):]
        self._advance()
        return new_text

    def _advance(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _flush(self) -> None:
        """Accept whatever the unread tokens decode to, complete or not (end of output)."""
        self._flushed = True
        if self._stop_hit is not None or self._read_offset == len(self._ids):
            return
        window_text = self._decode(self._prefix_offset, len(self._ids))
        self._text += window_text[len(self._prefix_text):]
        self._advance()

    def _check_stop(self, old_len: int) -> str | None:
        if not self._stop:
            return None
        start = max(0, old_len - self._max_stop_len + 1)
        best_pos, best = -1, None
        for s in self._stop:
            pos = self._text.find(s, start)
            if pos != -1 and (best is None or pos < best_pos or (pos == best_pos and len(s) > len(best))):
                best_pos, best = pos, s
        if best is None:
            return None
        self._text = self._text[: best_pos + len(best) if self._include_stop else best_pos]
        self._returned = min(self._returned, len(self._text))
        self._stop_hit = best
        return best

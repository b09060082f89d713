"""How long the next step may take when the engine protects a TPOT SLO (the scheduler's time budget).

TPOT is a mean per request, so a step may take more than the SLO when the requests it decodes can
afford it:

* **slack**: a request that got its tokens faster than the SLO has ``first token time + SLO x tokens so
  far - now`` to spare; a step may take the least slack of its batch, less the step in flight (one
  SLO, or that step's predicted time when it is longer: a long step paid for with slack must not leave
  the same slack to the next one);
* **borrowing** (``borrow_tokens`` B > 0): a request may also lend the next step time from up to B of
  its later tokens (as many as it can be counted on for: up to ``max_tokens``, or for one that may stop
  early what finished requests say, :mod:`pdserve.engine.output_lengths`), each assumed to come at
  :data:`~pdserve.common.step_model.BORROW_LATER_TOKEN_SHARE` of the SLO
  (:func:`~pdserve.common.step_model.borrowed_step_s`); the step takes the least any decoding request
  lends, at most :data:`~pdserve.common.step_model.BORROW_STEP_CAP` SLOs. A request that has just started
  has no slack but a whole output to spread one long step over: so a worker may take a whole prompt in
  one step (fewer, larger chunks, none of them over context) and pay the time back with the decode-only
  steps after it; a request that has fallen behind (negative slack) lends that much less, which pulls
  the budget back towards the SLO;
* **window** (``window`` W > 1): a step may also take what keeps the mean predicted time of the last W
  steps within the SLO (:func:`~pdserve.common.step_model.window_step_budget`), unless a running decode
  may produce fewer than W tokens in all (``max_tokens``): a request that has just started has no slack
  of its own, but its mean over W or more steps stays near the SLO (within one capped step spread over
  its output).

Never less than the SLO itself. Only while the window is open (:meth:`StepBudget.window_open`) may the
scheduler defer a prefill chunk the budget would cut short (``defer_chunks_below``): only then do the
decode-only steps it runs meanwhile build up room for a longer step. One instance per scheduler; engine
thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from pdserve.common.step_model import in_flight_allowance_s, slack_step_budget_s, window_step_budget
from pdserve.engine.output_lengths import OutputLengths
from pdserve.engine.request import Request


def _decoding(running: Sequence[Request]) -> list[Request]:
    return [r for r in running if r.first_token_time is not None and r.num_tokens_to_compute == 1]


class StepBudget:
    def __init__(self, slo_s: float, window: int = 0, borrow_tokens: int = 0,
                 output_lengths: OutputLengths | None = None) -> None:
        self.slo_s = slo_s
        self.window = window
        self.borrow_tokens = borrow_tokens
        # the scheduler's, which outlives this budget
        self.output_lengths = OutputLengths() if output_lengths is None else output_lengths
        self.recent_s: deque[float] = deque(maxlen=max(window - 1, 0))  # predicted seconds of the last steps

    @property
    def settings(self) -> tuple[float, int, int]:
        """``(slo_s, window, borrow_tokens)``: what the budget was made with."""
        return self.slo_s, self.window, self.borrow_tokens

    def note_step(self, predicted_s: float) -> None:
        """A step was scheduled that is predicted to take ``predicted_s`` (kept for the window)."""
        self.recent_s.append(predicted_s)

    def window_room(self, running: Sequence[Request]) -> float | None:
        """The longest step the window allows now, or None while it is closed (off, not yet full, or a
        running decode's whole output is shorter than it)."""
        if any(r.params.max_tokens < self.window for r in _decoding(running)):
            return None
        return window_step_budget(self.slo_s, self.window, self.recent_s)

    def window_open(self, running: Sequence[Request]) -> bool:
        return self.window_room(running) is not None

    def seconds(self, running: Sequence[Request], now: float, in_flight_s: float = 0.0) -> float:
        """Seconds the next step may take, given the ``running`` requests (decodes among them count) and
        the predicted seconds of the step still in flight (``in_flight_s``; its tokens count as produced)."""
        base = self.slo_s
        decoding = _decoding(running)
        if not decoding:
            return base
        lenders = []
        for r in decoding:  # each has its first token (``_decoding``)
            assert r.first_token_time is not None
            produced = r.num_output_tokens + r.num_pending_tokens
            slack = r.first_token_time + base * produced - now - in_flight_allowance_s(base, in_flight_s)
            left = self.output_lengths.tokens_left(r, produced) if self.borrow_tokens else 0
            lenders.append((slack, left))
        budget = slack_step_budget_s(base, lenders, self.borrow_tokens)
        room = self.window_room(decoding)
        return max(budget, room if room is not None else base)

"""How long the next step may take when the engine protects a TPOT SLO (the scheduler's time budget).

TPOT is a mean per request, so a step may take more than the SLO when the requests it decodes can
afford it:

* **slack**: a request that got its tokens faster than the SLO has ``first token time + SLO x tokens so
  far - now`` to spare; a step may take the least slack of its batch, less one SLO for the step in
  flight;
* **window** (``window`` W > 1): a step may also take what keeps the mean predicted time of the last W
  steps within the SLO (at most ``WINDOW_STEP_CAP`` SLOs), unless a running decode may produce fewer
  than W tokens in all (``max_tokens``): a request that has just started has no slack of its own, but
  its mean over W or more steps stays near the SLO (within one capped step spread over its output).

Never less than the SLO itself. ``window_open`` says whether the last :meth:`StepBudget.seconds` could
use the window (it was full and no running request was shorter than it): only then may the scheduler
defer a prefill chunk the budget would cut short (``defer_chunks_below``), since only then do the
decode-only steps it runs meanwhile build up room for a longer step. One instance per scheduler; engine
thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from pdserve.common.step_model import WINDOW_STEP_CAP
from pdserve.engine.request import Request


class StepBudget:
    def __init__(self, slo_s: float, window: int = 0) -> None:
        self.slo_s = slo_s
        self.window = window
        self.recent_s: deque[float] = deque()  # predicted seconds of the last W - 1 steps
        self.window_open = False

    def note_step(self, predicted_s: float) -> None:
        """A step was scheduled that is predicted to take ``predicted_s`` (kept for the window)."""
        if self.window <= 1:
            return
        self.recent_s.append(predicted_s)
        while len(self.recent_s) > self.window - 1:
            self.recent_s.popleft()

    def seconds(self, running: Iterable[Request], now: float) -> float:
        """Seconds the next step may take, given the ``running`` requests (decodes among them count)."""
        base, window = self.slo_s, self.window
        least, short = None, False
        for request in running:
            if request.first_token_time is None or request.num_tokens_to_compute != 1:
                continue
            produced = request.num_output_tokens + request.num_pending_tokens
            slack = request.first_token_time + base * produced - now - base  # less the step in flight
            least = slack if least is None else min(least, slack)
            short = short or request.params.max_tokens < window
        self.window_open = window > 1 and not short and len(self.recent_s) == window - 1
        if least is None:
            return base
        budget = max(base, least)
        if self.window_open:
            budget = max(budget, min(base * window - sum(self.recent_s), base * WINDOW_STEP_CAP))
        return budget

"""How many more tokens a decoding request can be counted on for, from the output lengths of the requests
that finished before it (the step budget's borrowing, :mod:`pdserve.engine.step_budget`).

A request that may stop early (at EOS, a stop token or a stop string) has only ``max_tokens`` as an upper
bound on its output; borrowing against tokens it never produces would leave its mean TPOT over the SLO.
So its later tokens are counted as what a low quantile of the finished requests *that got as far as it
has* still produced: with ``share`` 0.25, three in four such requests went on at least that long. Until
``MIN_SAMPLES`` of them exist it is counted on for none beyond ``min_tokens``. A request that can only end
at ``max_tokens`` (``ignore_eos`` and no stop condition) is counted on for all of it.

One instance per scheduler (it outlives a role switch's new budget); engine thread only.
"""

from __future__ import annotations

import bisect
from collections import deque

from pdserve.engine.request import Request

#: Finished outputs kept (the most recent).
HISTORY = 1024
#: Finished outputs at least as long as a request's so far needed before its later tokens count.
MIN_SAMPLES = 16
#: The quantile of the finished requests' remaining lengths a request is counted on for.
SHARE = 0.25


def may_stop_early(request: Request) -> bool:
    params = request.params
    return not params.ignore_eos or bool(params.stop) or bool(params.stop_token_ids)


class OutputLengths:
    """The last ``history`` output lengths of finished requests that could have stopped early, sorted."""

    def __init__(self, history: int = HISTORY) -> None:
        self._order: deque[int] = deque()
        self._sorted: list[int] = []
        self._history = history

    def __len__(self) -> int:
        return len(self._sorted)

    def note_finished(self, request: Request) -> None:
        """Record the output length of a request that ended by itself (EOS, a stop, ``max_tokens``); only
        requests that could have stopped early say anything about those that can."""
        if not may_stop_early(request):
            return
        length = request.num_output_tokens
        self._order.append(length)
        bisect.insort(self._sorted, length)
        if len(self._order) > self._history:
            self._sorted.pop(bisect.bisect_left(self._sorted, self._order.popleft()))

    def tokens_left(self, request: Request, produced: int) -> int:
        """Tokens ``request`` can be counted on for after the next one, having ``produced`` so far (its
        pending token included)."""
        params = request.params
        limit = params.max_tokens - produced - 1
        if not may_stop_early(request):
            return limit
        guaranteed = params.min_tokens - produced - 1
        first = bisect.bisect_left(self._sorted, produced + 1)  # finished requests that got this far
        count = len(self._sorted) - first
        if count < MIN_SAMPLES:
            return max(0, guaranteed)
        typical = self._sorted[first + int(SHARE * (count - 1))] - produced - 1
        return max(0, guaranteed, min(limit, typical))

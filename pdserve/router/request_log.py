"""The requests that ended recently, as the router saw them: what the dashboard's latency, attainment
and load panels are computed from (the Prometheus histograms cannot give percentiles over a window).

Bounded twice: records older than ``window_s`` are dropped as new ones arrive, and at most
``max_records`` are kept (and the latest ``max_gaps`` inter-token gaps: enough for percentiles). Written and read on the router's event loop only.

With several router processes (``RouterConfig.processes``) the launcher copies what the others logged
into the first one's log (:meth:`RequestLog.after`, :meth:`RequestLog.merge`), so its dashboard and its
planner see every request; merged records may arrive out of time order, which the window queries
(``ended_since``, ``gaps_since``) do not mind.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class EndedRequest:
    ended_at: float  # time.time()
    e2e_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None  # None: no token came
    outcome: str  # finished | error | cancelled

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def meets(self, ttft_slo_s: float | None, tpot_slo_s: float | None) -> bool:
        """Finished within both SLOs (an SLO that is not set is met)."""
        if self.outcome != "finished" or self.ttft_s is None:
            return False
        tpot = self.tpot_s
        return ((ttft_slo_s is None or self.ttft_s <= ttft_slo_s)
                and (tpot_slo_s is None or tpot is None or tpot <= tpot_slo_s))


class RequestLog:
    def __init__(self, window_s: float = 300.0, max_records: int = 50_000, max_gaps: int = 20_000) -> None:
        self.window_s = window_s
        self._records: deque[EndedRequest] = deque(maxlen=max_records)
        self._gaps: deque[tuple[float, float]] = deque(maxlen=max_gaps)  # (time.time(), seconds)

    def add(self, record: EndedRequest) -> None:
        self._records.append(record)
        self._trim(record.ended_at)

    def add_gap(self, seconds: float) -> None:
        """One inter-token gap (for ITL percentiles)."""
        self._gaps.append((time.time(), seconds))

    def ended_since(self, since: float) -> list[EndedRequest]:
        return [r for r in self._records if r.ended_at >= since]

    def gaps_since(self, since: float) -> list[float]:
        return [g for t, g in self._gaps if t >= since]

    def after(self, after: float) -> tuple[list[EndedRequest], list[tuple[float, float]]]:
        """Records that ended, and gaps (``(time.time(), seconds)``) taken, strictly after ``after``."""
        return ([r for r in self._records if r.ended_at > after], [g for g in self._gaps if g[0] > after])

    def merge(self, records: list[EndedRequest], gaps: list[tuple[float, float]]) -> None:
        """Add another router process's records and gaps (see the module)."""
        self._records.extend(records)
        self._gaps.extend(gaps)
        if records:
            self._trim(max(r.ended_at for r in records))

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._records and self._records[0].ended_at < horizon:
            self._records.popleft()
        while self._gaps and self._gaps[0][0] < horizon:
            self._gaps.popleft()

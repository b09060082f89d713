"""Per-request timings and the metrics the field reports (vLLM's serving metrics, DistServe's goodput).

* TTFT: first token received - request sent.
* TPOT: (last token - first token) / (output tokens - 1): the first token is excluded; undefined for
  one-token outputs (such a request meets any TPOT SLO).
* ITL: every gap between consecutive token arrivals (a chunk of k tokens adds one gap and k-1 zeros).
* E2E: last token - sent.
* SLO attainment: the fraction of requests that finished without error AND met both the TTFT and the
  TPOT SLO. Goodput: the highest request rate (per GPU) whose attainment is >= 90%.
"""

from __future__ import annotations

import collections
import re
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    index: int
    scheduled_s: float
    sent_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # one entry per received token
    num_prompt_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent_s if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [t[i] - t[i - 1] for i in range(1, len(t))]

    @property
    def e2e(self) -> float | None:
        return self.token_times[-1] - self.sent_s if self.token_times else None

    @property
    def lag(self) -> float:
        """How late the client sent this request compared with its schedule."""
        return self.sent_s - self.scheduled_s

    def meets(self, ttft_slo: float, tpot_slo: float) -> bool:
        if not self.ok:
            return False
        tpot = self.tpot
        return self.ttft <= ttft_slo and (tpot is None or tpot <= tpot_slo)  # type: ignore[operator]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        """The record ``to_dict`` wrote."""
        return cls(index=data["index"], scheduled_s=data["scheduled_s"], sent_s=data["sent_s"],
                   token_times=list(data["token_times_s"]), num_prompt_tokens=data["num_prompt_tokens"],
                   error=data["error"])

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "scheduled_s": self.scheduled_s, "sent_s": self.sent_s,
                "num_prompt_tokens": self.num_prompt_tokens, "num_output_tokens": len(self.token_times),
                "ttft_s": self.ttft, "tpot_s": self.tpot, "e2e_s": self.e2e, "error": self.error,
                "token_times_s": self.token_times}


def percentiles(values: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in ps}
    s = sorted(values)
    out: dict[str, float | None] = {}
    for p in ps:
        k = (len(s) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        out[f"p{p}"] = s[lo] + (s[hi] - s[lo]) * (k - lo)
    return out


def attainment(records: list[RequestRecord], ttft_slo: float, tpot_slo: float) -> float:
    return sum(r.meets(ttft_slo, tpot_slo) for r in records) / len(records) if records else 0.0


def summarize(records: list[RequestRecord], duration_s: float, slos: list[tuple[float, float]]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    tokens = sum(len(r.token_times) for r in ok)
    itl = [x for r in ok for x in r.itls]
    lags = [r.lag for r in records]
    return {
        "requests": len(records), "errors": len(records) - len(ok), "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_token_throughput": tokens / duration_s if duration_s else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": percentiles(itl), "e2e_s": percentiles([r.e2e for r in ok if r.e2e is not None]),
        "client_lag_s": {"max": max(lags, default=0.0), **percentiles(lags, (99,))},
        "slo_attainment": {f"ttft<={t * 1e3:g}ms,tpot<={p * 1e3:g}ms": attainment(records, t, p) for t, p in slos},
        "error_kinds": error_kinds(records),
        "arrivals_over_e2e": arrivals_over_e2e(records),
    }


#: Request ids and numbers differ between otherwise equal error messages.
_VARIABLE = re.compile(r"request \S+|\d+(\.\d+)?")


def error_kinds(records: list[RequestRecord], top: int = 5) -> dict[str, int]:
    """The most frequent error messages (ids and numbers masked) with their counts."""
    kinds = collections.Counter(_VARIABLE.sub(lambda m: "request <id>" if m.group().startswith("request") else "N",
                                              r.error)[:200] for r in records if r.error is not None)
    return dict(kinds.most_common(top))


def arrivals_over_e2e(records: list[RequestRecord]) -> float | None:
    """How many median request lifetimes the arrivals span. The lower, the less a point says about a
    sustained load: below ~1 its requests were nearly all in flight together, and a queue forms only if
    they exceed the workers' slots at once (decode-heavy points of 200 requests of ~10 s each arrived
    within 4-12 s and all fit one decode worker's 256 running slots; sustained, that rate failed)."""
    e2e = [r.e2e for r in records if r.ok and r.e2e is not None]
    if len(records) < 2 or not e2e:
        return None
    window = max(r.scheduled_s for r in records) - min(r.scheduled_s for r in records)
    return round(window / statistics.median(e2e), 2)


def goodput(points: list[tuple[float, float]], target: float = 0.9) -> float:
    """Highest per-GPU rate whose attainment >= ``target`` among the swept ``(rate, attainment)`` points,
    with linear interpolation towards the first failing rate above it (0.0 if none passes)."""
    points = sorted(points)
    best = 0.0
    for i, (rate, att) in enumerate(points):
        if att >= target:
            best = rate
            if i + 1 < len(points) and points[i + 1][1] < target:
                nxt_rate, nxt_att = points[i + 1]
                best = rate + (nxt_rate - rate) * (att - target) / (att - nxt_att)
    return best


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None

"""The order of a worker's fresh prompts under a TTFT SLO: the rule both the engine's scheduler
(:mod:`pdserve.engine.deadline_order`) and the planner's simulated workers (:mod:`pdserve.planner.simulate`)
apply, so the simulation queues prompts as the workers it predicts do.

Earliest deadline (arrival + SLO) first, except that prompts which can no longer meet it -- predicted from
the prompt tokens queued ahead of them at the worker's prefill rate -- go after those that still can (they
are served, and counted late); a prompt waiting longer than ``LATE_PROMOTION_FACTOR`` SLOs goes first of
all, so none starves. Pure: no torch, no clock (the caller passes ``now``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

#: A prompt that has waited this many TTFT SLOs is admitted before every other fresh prompt.
LATE_PROMOTION_FACTOR = 4.0

T = TypeVar("T")


def deadline_order(fresh: Iterable[T], *, arrival_s: Callable[[T], float], prompt_tokens: Callable[[T], int],
                   slo_s: float, prefill_tokens_per_s: float | None, now: float) -> tuple[list[T], list[T]]:
    """``fresh`` prompts in deadline order (promoted, then on time, then late), and the late ones.

    ``arrival_s`` and ``now`` are on one clock; ``prefill_tokens_per_s`` None: prompts cost no time (only
    a deadline already passed makes a prompt late)."""
    on_time: list[T] = []
    late: list[T] = []
    promoted: list[T] = []
    ahead_s = 0.0
    for prompt in sorted(fresh, key=arrival_s):
        arrived = arrival_s(prompt)
        if now - arrived > LATE_PROMOTION_FACTOR * slo_s:
            promoted.append(prompt)
            continue
        cost_s = prompt_tokens(prompt) / prefill_tokens_per_s if prefill_tokens_per_s else 0.0
        if now + ahead_s + cost_s <= arrived + slo_s:
            on_time.append(prompt)
            ahead_s += cost_s
        else:
            late.append(prompt)
    return promoted + on_time + late, late

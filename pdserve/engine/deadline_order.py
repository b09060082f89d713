"""The order of a scheduler's waiting queue under a TTFT SLO (``SchedulerConfig.ttft_slo_s``).

Fresh local prompts go earliest deadline (arrival + SLO) first, except that those which can no longer
meet it -- predicted from the prompt tokens queued ahead of them at the engine's prefill rate -- go
after those that still can (they are served, and counted late once); a prompt waiting longer than
``LATE_PROMOTION_FACTOR`` SLOs goes first of all, so none starves. Preempted requests, remote-prefill
requests and those with output already keep their place at the head.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from pdserve.engine.request import Request, RequestStatus

#: A prompt that has waited this many TTFT SLOs is admitted before every other fresh prompt.
LATE_PROMOTION_FACTOR = 4.0


def order_by_deadline(waiting: Iterable[Request], slo_s: float, prefill_tokens_per_s: float | None,
                      now: float) -> tuple[deque[Request], int]:
    """The queue in deadline order (see the module), and how many prompts were found late for the first
    time (their ``deadline_missed`` is set). ``prefill_tokens_per_s`` None: prompts cost no time."""
    head: list[Request] = []
    fresh: list[Request] = []
    for request in waiting:
        local = request.status == RequestStatus.WAITING and not request.remote_prefill
        (fresh if local and not request.num_output_tokens else head).append(request)
    on_time, late, promoted = [], [], []
    ahead_s, newly_late = 0.0, 0
    for request in sorted(fresh, key=lambda r: r.arrival_time):
        if now - request.arrival_time > LATE_PROMOTION_FACTOR * slo_s:
            promoted.append(request)
            continue
        cost_s = request.num_prompt_tokens / prefill_tokens_per_s if prefill_tokens_per_s else 0.0
        if now + ahead_s + cost_s <= request.arrival_time + slo_s:
            on_time.append(request)
            ahead_s += cost_s
        else:
            if not request.deadline_missed:
                request.deadline_missed = True
                newly_late += 1
            late.append(request)
    return deque(head + promoted + on_time + late), newly_late

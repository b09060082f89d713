"""The order of a scheduler's waiting queue under a TTFT SLO (``SchedulerConfig.ttft_slo_s``).

Fresh local prompts go in the order of :func:`pdserve.common.deadline_order.deadline_order` (earliest
deadline first, those that can no longer meet it after those that can, none starving); preempted
requests, remote-prefill requests and those with output already keep their place at the head.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from pdserve.common.deadline_order import deadline_order
from pdserve.engine.request import Request, RequestStatus


def order_by_deadline(waiting: Iterable[Request], slo_s: float, prefill_tokens_per_s: float | None,
                      now: float) -> tuple[deque[Request], int]:
    """The queue in deadline order (see the module), and how many prompts were found late for the first
    time (their ``deadline_missed`` is set). ``prefill_tokens_per_s`` None: prompts cost no time."""
    head: list[Request] = []
    fresh: list[Request] = []
    for request in waiting:
        local = request.status == RequestStatus.WAITING and not request.remote_prefill
        (fresh if local and not request.num_output_tokens else head).append(request)
    ordered, late = deadline_order(fresh, arrival_s=lambda r: r.arrival_time, prompt_tokens=lambda r: r.num_prompt_tokens,
                                   slo_s=slo_s, prefill_tokens_per_s=prefill_tokens_per_s, now=now)
    newly_late = 0
    for request in late:
        if not request.deadline_missed:
            request.deadline_missed = True
            newly_late += 1
    return deque(head + ordered), newly_late

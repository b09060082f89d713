"""Continuous batching in token counts: which requests compute how many tokens in the next step.

Each step has a budget of ``max_num_batched_tokens``. Running requests are served first, in admission
order (a decode takes 1 token, an unfinished prefill the rest of its prompt up to the budget: chunked
prefill); then waiting requests are admitted in arrival order while budget, ``max_num_seqs`` and free
blocks allow, starting past any prefix-cache hit. When a running request needs a block and none is
free, the most recently admitted running request is preempted: its blocks are freed and it returns to
the head of the queue to be recomputed later (its cached full blocks usually make that cheap).

Requests whose prompt KV is computed elsewhere (``remote_prefill``, the decode role) are admitted
without compute: the scheduler allocates blocks for the whole prompt (a landing zone, past any local
prefix-cache hit), marks them ``WAITING_FOR_KV`` and lists them in the plan; :meth:`Scheduler.kv_arrived`
later makes them running with the prompt computed. A request that is preempted recomputes locally.

The scheduler never runs the model: it emits one :class:`SchedulerPlan` per step, and after the step the
engine calls :meth:`Scheduler.finish_step` (advance computed counts, index full blocks) and
:meth:`Scheduler.finish` for requests that ended.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.kv_cache.manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    enable_chunked_prefill: bool = True


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens ``[start, start + num_tokens)`` of ``request`` with KV in ``block_ids``.

    ``samples`` (fixed when scheduled): the chunk reaches the request's last known token, so the step
    samples a new token from its last row.
    """

    request: Request
    start: int
    num_tokens: int
    block_ids: list[int]
    samples: bool

    @classmethod
    def of(cls, request: Request, num_tokens: int, block_ids: list[int]) -> ScheduledChunk:
        start = request.num_computed_tokens
        return cls(request, start, num_tokens, block_ids, start + num_tokens == request.num_tokens)


@dataclass
class SchedulerPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    landing_zones: list[Request] = field(default_factory=list)  # newly WAITING_FOR_KV requests

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue management ----------------------------------------------------------------------

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.waiting_for_kv)

    @property
    def num_admitted(self) -> int:
        return len(self.running) + len(self.waiting_for_kv)

    def finish(self, request: Request, status: RequestStatus, *, free_blocks: bool = True) -> None:
        """End ``request`` with a finished ``status``: drop it from the queues and free its blocks once
        (``free_blocks=False`` leaves them allocated: the caller frees them later through the KV manager)."""
        assert status.is_finished, status
        if request.is_finished:
            return
        if request.status == RequestStatus.WAITING_FOR_KV:
            del self.waiting_for_kv[request.request_id]
        elif request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if free_blocks:
            self.kv.free(request)
        request.status = status

    def recompute_locally(self, request: Request) -> None:
        """Give up on remote KV for a ``WAITING_FOR_KV`` request: free its landing zone and queue it
        (first) to compute its prompt here."""
        assert request.status == RequestStatus.WAITING_FOR_KV, request.status
        del self.waiting_for_kv[request.request_id]
        self.kv.free(request)
        request.remote_prefill = False
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def kv_arrived(self, request: Request) -> None:
        """The landing zone of ``request`` now holds its whole prompt's KV: it runs from the next step."""
        assert request.status == RequestStatus.WAITING_FOR_KV, request.status
        del self.waiting_for_kv[request.request_id]
        request.num_computed_tokens = request.num_prompt_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.kv.cache_full_blocks(request)

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerPlan:
        plan = SchedulerPlan()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens_to_compute, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is request:
                    break
            if request.status == RequestStatus.PREEMPTED:
                break
            plan.chunks.append(self._chunk(request, num_new))
            budget -= num_new
            i += 1
        if not plan.preempted:
            self._admit_waiting(plan, budget)
        return plan

    def _admit_waiting(self, plan: SchedulerPlan, budget: int) -> None:
        while self.waiting and budget > 0 and self.num_admitted < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request)
            num_cached_tokens = len(cached) * self.kv.block_size
            remaining = request.num_tokens - request.num_computed_tokens - num_cached_tokens
            if request.remote_prefill and request.status == RequestStatus.WAITING:
                if not self.kv.allocate_slots(request, remaining, cached):
                    break
                self.waiting.popleft()
                self.kv.record_prefix_lookup(request.num_tokens, num_cached_tokens)
                request.num_cached_tokens = num_cached_tokens
                request.num_computed_tokens = num_cached_tokens
                request.status = RequestStatus.WAITING_FOR_KV
                self.waiting_for_kv[request.request_id] = request
                plan.landing_zones.append(request)
                continue
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            num_new = min(remaining, budget)
            if not self.kv.allocate_slots(request, num_new, cached):
                break
            self.waiting.popleft()
            self.kv.record_prefix_lookup(request.num_tokens, num_cached_tokens)
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached_tokens
            request.num_computed_tokens += num_cached_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.chunks.append(self._chunk(request, num_new))
            budget -= num_new

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        return ScheduledChunk.of(request, num_new, self.kv.block_ids(request.request_id))

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.remote_prefill = False  # recomputed locally from now on
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish_step(self, plan: SchedulerPlan) -> None:
        """Record that the plan's chunks were computed: advance counts and index newly full blocks."""
        for chunk in plan.chunks:
            request = chunk.request
            request.num_computed_tokens = chunk.start + chunk.num_tokens
            self.kv.cache_full_blocks(request)

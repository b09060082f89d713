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
later makes them running with the prompt computed. Zones are opened before local prompts are admitted
and outside the token and time budgets (a zone costs blocks only, and the remote GPU starts on the
prompt once its zone exists), unless a preempted request waits for blocks. A request that is preempted
recomputes locally.

SLO-aware scheduling (both optional, set from the cluster's ``slo``):

* ``step_time_budget_s`` with a step-time model: a step that carries decodes takes prefill tokens only
  as long as its predicted time stays within its budget; a step with no decodes takes its whole token
  budget, and a step whose decodes alone exceed the budget still advances one prefill chunk of
  ``min_prefill_chunk`` tokens (no prompt starves); a chunk the budget cuts is grown to fill the padding
  rows of the CUDA graph its step replays (``graph_rows``), and with ``pad_with_next_prompt`` a prompt
  the budget leaves out of a step takes whatever padding rows its graph still has. The budget is the
  TPOT SLO, or more when the running requests can afford it (:mod:`pdserve.engine.step_budget`: their slack; with
  ``borrow_tokens`` what their later tokens can pay back; with ``budget_window`` the mean of the last
  steps); long chunks then ride on the slack fast decode steps build up, instead of every step being
  held to the SLO. With ``defer_chunks_below`` N (and the
  window), a prompt chunk the budget would cut below N tokens waits instead, unless its request has
  waited ``DEFER_TTFT_SHARE`` of the TTFT SLO: the decode-only steps run meanwhile make room in the
  window for one longer, more efficient step, as fixed long chunks get.
* ``ttft_slo_s``: fresh prompts are admitted earliest-deadline first, those that can no longer meet
  their deadline after those that can, none starving (:mod:`pdserve.engine.deadline_order`).

The scheduler never runs the model: it emits one :class:`SchedulerPlan` per step, and after the step the
engine calls :meth:`Scheduler.finish_step` (advance computed counts, index full blocks) and
:meth:`Scheduler.finish` for requests that ended.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.common import switches
from pdserve.common.config import EngineConfig
from pdserve.common.step_model import DEFER_TTFT_SHARE
from pdserve.engine.deadline_order import order_by_deadline
from pdserve.engine.kv_cache.manager import KVCacheManager
from pdserve.engine.output_lengths import OutputLengths
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.step_budget import StepBudget
from pdserve.engine.step_plan import ScheduledChunk, SchedulerPlan
from pdserve.engine.step_time import StepShape, StepTimeModel

#: ``PDSERVE_FILL_GRAPH_PADDING=0`` leaves budget-cut chunks as cut (an A/B switch for benchmarks; see
#: ``Scheduler.graph_rows``)
FILL_GRAPH_PADDING = switches.FILL_GRAPH_PADDING.flag()
#: ``PDSERVE_PAD_WITH_NEXT_PROMPT=1``: a prompt the step budget leaves out takes the padding rows its step's graph
#: still has (``Scheduler.pad_with_next_prompt``). Off: on one H200 (prefill-heavy, two seeds) it gained 2%,
#: not told apart from run-to-run variation (``serve-g1padnext*``).
PAD_WITH_NEXT_PROMPT = switches.PAD_WITH_NEXT_PROMPT.flag()


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    enable_chunked_prefill: bool = True
    step_time_budget_s: float | None = None
    ttft_slo_s: float | None = None
    min_prefill_chunk: int = 32
    budget_window: int = 0  # steps (StepBudget.window); 0: the SLO and the batch's least slack only
    borrow_tokens: int = 0  # later tokens a request may borrow a step's time from (StepBudget); 0: none
    defer_chunks_below: int = 0  # tokens; 0: a chunk the budget cuts runs cut

    @classmethod
    def of(cls, config: EngineConfig) -> SchedulerConfig:
        """The scheduler's part of an engine's (validated) config, its times in seconds."""
        return cls(config.max_num_batched_tokens, config.max_num_seqs, config.enable_chunked_prefill,
                   step_time_budget_s=None if config.step_time_budget_ms is None else config.step_time_budget_ms / 1e3,
                   ttft_slo_s=None if config.ttft_slo_ms is None else config.ttft_slo_ms / 1e3,
                   budget_window=config.step_budget_window, borrow_tokens=config.step_budget_borrow_tokens,
                   defer_chunks_below=config.defer_chunks_below)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, step_time: StepTimeModel | None = None) -> None:
        self.config = config
        self.kv = kv
        self.step_time = step_time
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_kv: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_late_prompts = 0  # prompts predicted to miss their TTFT deadline (queued after those that can)
        self.num_budget_cut_chunks = 0  # prefill chunks shortened to keep a step within its time budget
        self.num_deferred_chunks = 0  # prefill chunks put off to a later step rather than cut short
        self.num_filled_chunks = 0  # budget-cut chunks grown into their CUDA graph's padding rows
        self.deferred_free: list[Request] = []  # finished with a row in a launched step (see release_landed)
        self._budget: StepBudget | None = None  # see the budget property
        self.output_lengths = OutputLengths()  # of finished requests, for the budget's borrowing
        # rows a step of n tokens computes (its CUDA graph's padded size; set by the engine once captured)
        self.graph_rows: Callable[[int], int] | None = None
        self.pad_with_next_prompt = False  # a prompt the budget leaves out still takes the graph's padding rows
        # predicted seconds of the step still on the device while the next is planned (asynchronous
        # scheduling; set by the engine before each ``schedule``): the step budget's slack allows for it
        self.in_flight_s = 0.0

    def use_graph_rows(self, graph_rows: Callable[[int], int]) -> None:
        """Once the engine captured its CUDA graphs: a chunk the budget cuts grows into its step's graph
        padding (unless ``PDSERVE_FILL_GRAPH_PADDING=0``), and with ``PDSERVE_PAD_WITH_NEXT_PROMPT=1`` a
        prompt the budget leaves out takes what padding is left."""
        if FILL_GRAPH_PADDING:
            self.graph_rows = graph_rows
            self.pad_with_next_prompt = PAD_WITH_NEXT_PROMPT

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
        if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.output_lengths.note_finished(request)
        if request.status == RequestStatus.WAITING_FOR_KV:
            del self.waiting_for_kv[request.request_id]
        elif request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if free_blocks:
            if request.num_pending_tokens:  # a launched step still writes its KV: free once that step landed
                self.deferred_free.append(request)
            else:
                self.kv.free(request)
        request.status = status

    def release_landed(self, *, all_landed: bool = False) -> None:
        """Free the blocks of finished requests no launched step writes any more (``all_landed``: no step
        is in flight at all). Until then they stay allocated: a block freed while a step still writes a
        row into it could be handed to a landing zone that another GPU fills first."""
        if not self.deferred_free:
            return
        still = []
        for request in self.deferred_free:
            if request.num_pending_tokens and not all_landed:
                still.append(request)
            else:
                self.kv.free(request)
        self.deferred_free = still

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
        step = self.decode_shape()
        budget_s = self.step_budget() if step.tokens else None  # None: no decodes to protect, or no budget
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            wanted = request.num_tokens_to_compute
            num_new = (min(wanted, budget) if wanted <= 1
                       else self._prefill_tokens(plan, step, budget_s, request, request.num_computed_tokens, wanted,
                                                 budget))
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
            if wanted > 1:
                step = step.plus_chunk(num_new, request.num_computed_tokens)
            budget -= num_new
            i += 1
        if not plan.preempted:
            self._admit_waiting(plan, budget, step, budget_s)
        self._note_step(plan)
        return plan

    @property
    def budget(self) -> StepBudget | None:
        """The step budget of the current config (None without ``step_time_budget_s``); made anew when
        the config's budget, window or borrowing changes (a worker switching roles replaces the config)."""
        slo, window, borrow = self.config.step_time_budget_s, self.config.budget_window, self.config.borrow_tokens
        if slo is None:
            return None
        if self._budget is None or self._budget.settings != (slo, window, borrow):
            self._budget = StepBudget(slo, window, borrow, self.output_lengths)
        return self._budget

    def _note_step(self, plan: SchedulerPlan) -> None:
        """Record what the plan is predicted to take (``plan.predicted_s``: the next plan's budget allows
        for it while it is in flight) and tell the step budget's window."""
        budget = self.budget
        if budget is None or self.step_time is None or plan.is_empty:
            return
        plan.predicted_s = self.step_time.predict(plan.shape)
        if budget.window > 1:
            budget.note_step(plan.predicted_s)  # the window needs predicted times

    def step_budget(self, now: float | None = None) -> float | None:
        """Seconds the next step may take (:class:`~pdserve.engine.step_budget.StepBudget`); None without
        a budget."""
        budget = self.budget
        if budget is None:
            return None
        return budget.seconds(self.running, time.monotonic() if now is None else now, self.in_flight_s)

    def decode_shape(self) -> StepShape:
        """The decodes the next step will carry (the budget for prefill chunks is what they leave)."""
        if self.step_time is None or self.config.step_time_budget_s is None:
            return StepShape(0)
        contexts = [r.num_computed_tokens for r in self.running if r.num_tokens_to_compute == 1]
        return StepShape(len(contexts), sum(contexts), 0.0, len(contexts))

    def _prefill_tokens(self, plan: SchedulerPlan, step: StepShape, budget_s: float | None, request: Request,
                        context: int, wanted: int, budget: int) -> int:
        """How many of ``wanted`` prompt tokens of ``request`` (after ``context`` computed ones) a chunk gets
        in a step already carrying ``step`` whose time budget is ``budget_s`` (None: the token budget
        alone decides); 0: none this step."""
        limit = min(wanted, budget)
        if self.step_time is None or budget_s is None:
            return limit
        fits = self.step_time.max_chunk_tokens(step, budget_s, limit, context)
        if fits < min(limit, self.config.defer_chunks_below) and self._may_defer(request):
            self.num_deferred_chunks += 1
            return 0
        if fits == 0 and not any(c.num_tokens > 1 for c in plan.chunks):
            fits = min(limit, self.config.min_prefill_chunk)  # over budget already: still advance one chunk
        if fits == 0 and self.pad_with_next_prompt and self.graph_rows is not None:
            fits = min(limit, self.graph_rows(step.tokens) - step.tokens)  # rows the step's graph computes anyway
            self.num_filled_chunks += fits > 0
        if 0 < fits < limit and self.graph_rows is not None:  # the step's graph computes its padding rows anyway
            rows = step.tokens + fits
            grown = min(limit, fits + self.graph_rows(rows) - rows)
            self.num_filled_chunks += grown > fits
            fits = grown
        if fits < limit:
            self.num_budget_cut_chunks += 1
        return fits

    def _may_defer(self, request: Request) -> bool:
        """Whether a chunk of ``request`` the budget would cut short may wait for a later step instead."""
        budget, ttft = self.budget, self.config.ttft_slo_s
        return (budget is not None and ttft is not None and budget.window_open(self.running)
                and time.monotonic() - request.arrival_time < ttft * DEFER_TTFT_SHARE)

    def _admit_waiting(self, plan: SchedulerPlan, budget: int, step: StepShape, budget_s: float | None) -> None:
        self._admit_landing_zones(plan)
        if self.config.ttft_slo_s is not None and len(self.waiting) > 1:
            self._order_by_deadline()
        while self.waiting and budget > 0 and self.num_admitted < self.config.max_num_seqs:
            request = self.waiting[0]
            assert request.num_pending_tokens == 0, "a waiting request has no token in flight"
            if request.remote_prefill and request.status == RequestStatus.WAITING:
                if not self._open_landing_zone(request, plan):
                    break
                self.waiting.popleft()
                continue
            cached = self.kv.find_cached_prefix(request)
            num_cached_tokens = len(cached) * self.kv.block_size
            remaining = request.num_tokens - request.num_computed_tokens - num_cached_tokens
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            context = request.num_computed_tokens + num_cached_tokens
            num_new = min(remaining, budget)
            if remaining > 1:
                num_new = self._prefill_tokens(plan, step, budget_s, request, context, remaining, budget)
                if num_new <= 0:
                    break
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
            step = step.plus_chunk(num_new, context) if num_new > 1 else step.plus_decode(context)
            budget -= num_new

    def open_landing_zones(self) -> list[Request]:
        """Open what landing zones fit now, outside a step (see :meth:`_admit_landing_zones`)."""
        plan = SchedulerPlan()
        self._admit_landing_zones(plan)
        return plan.landing_zones

    def _admit_landing_zones(self, plan: SchedulerPlan) -> None:
        """Admit every waiting remote-prefill request whose landing zone fits, in arrival order, whatever
        the local prompts around it wait for: a landing zone costs blocks, not step time, and its prompt
        is computed on another GPU only once it exists, so holding it back behind a local prompt that
        waits for step budget would idle that GPU and add a step or more to its TTFT. Not while a
        preempted request waits (blocks are short: it goes first)."""
        remote = False
        for r in self.waiting:  # one pass: no zone opens while a preempted request waits for blocks
            if r.status == RequestStatus.PREEMPTED:
                return
            remote = remote or r.remote_prefill
        if not remote:
            return
        kept: deque[Request] = deque()
        blocked = False
        for request in self.waiting:
            if (blocked or not request.remote_prefill or request.status != RequestStatus.WAITING
                    or self.num_admitted >= self.config.max_num_seqs):
                kept.append(request)
                continue
            if not self._open_landing_zone(request, plan):
                blocked = True  # later zones wait too: first come, first served for blocks
                kept.append(request)
        self.waiting = kept

    def _open_landing_zone(self, request: Request, plan: SchedulerPlan) -> bool:
        """Allocate blocks for the whole prompt of a remote-prefill ``request`` (past any prefix-cache
        hit) and mark it ``WAITING_FOR_KV``; False (nothing changed) when the blocks are not free."""
        cached = self.kv.find_cached_prefix(request)
        num_cached_tokens = len(cached) * self.kv.block_size
        if not self.kv.allocate_slots(request, request.num_tokens - num_cached_tokens, cached):
            return False
        self.kv.record_prefix_lookup(request.num_tokens, num_cached_tokens)
        request.num_cached_tokens = num_cached_tokens
        request.num_computed_tokens = num_cached_tokens
        request.status = RequestStatus.WAITING_FOR_KV
        self.waiting_for_kv[request.request_id] = request
        plan.landing_zones.append(request)
        return True

    def _order_by_deadline(self) -> None:
        """The waiting queue in TTFT-deadline order (:mod:`pdserve.engine.deadline_order`)."""
        slo = self.config.ttft_slo_s
        assert slo is not None
        rate = self.step_time.prefill_tokens_per_s(self.config.max_num_batched_tokens) if self.step_time else None
        self.waiting, newly_late = order_by_deadline(self.waiting, slo, rate, time.monotonic())
        self.num_late_prompts += newly_late

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

"""A discrete-event simulation of a pdserve cluster over a step-time profile: what ``pdserve plan``
predicts with.

Each worker runs engine steps back to back while it has work, each lasting what the profile's
:class:`~pdserve.engine.step_time.StepTimeModel` predicts for what the step carries, as pdserve's own
scheduler builds it:

* a **colocated** worker runs every decode it holds plus prompt tokens, first come first served (with a
  TTFT SLO: in the engine's deadline order, see :mod:`pdserve.planner.sim_worker`), up to its token
  budget and, with a TPOT budget, only as many as keep the step within it (at least
  ``min_prefill_chunk`` when its decodes alone exceed it, so no prompt starves), a chunk so cut growing
  into the padding rows of the CUDA graph its step replays (``WorkerSpec.graph_rows``). The step's time
  budget is the engine's: the TPOT SLO, or the least slack of its decoding requests when that is more
  (a request whose tokens came faster than the SLO may take a longer step; planned at the step
  boundary, with no step in flight to allow for), with borrowing from later tokens (``borrow_tokens``),
  the window budget and chunk deferral (``budget_window``, ``defer_below``) as the engine applies them;
* a **prefill** worker runs prompt chunks up to its token budget; when a prompt's last chunk is done its
  first token exists, and its KV reaches a decode worker ``transfer_s(prompt)`` later;
* a **decode** worker runs one token per held request each step; a request joins at the first step
  after its KV arrived. With ``spill_ttft_s`` (TTFT-aware placement, what pdserve's router does when
  an SLO is set) it also computes the prompts the router keeps on it, in chunks within its step budget,
  as a colocated worker does.

The router sends a prompt to the prefill worker with the fewest queued prompt tokens and a request to
the decode (or colocated) worker holding the fewest requests. With ``spill_ttft_s``, a prompt whose
prefill pool would answer later than that stays on the decode worker that would finish it soonest (the
one of fewest requests unless another is strictly sooner) when that worker would be faster: queued prompt
tokens over the prefill rate of back-to-back chunks, against its queued local prompt tokens over the spare
rate its decodes leave within its step budget. A request's TTFT is its first token
minus its arrival (plus the handoff for remote prefills: the client sees the first token once the
decode worker has it), its TPOT the mean time per later token.

Each worker also models its prefix cache and its KV capacity (blocks on demand, preemption and
recomputation when they run out): see :mod:`pdserve.planner.sim_worker`, which holds a worker's state.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable

from pdserve.common.deadline_order import deadline_order
from pdserve.common.graph_sizes import padded_rows
from pdserve.common.step_model import (
    DEFER_TTFT_SHARE,
    StepShape,
    StepTimeModel,
    in_flight_allowance_s,
    slack_step_budget_s,
    window_step_budget,
)
from pdserve.planner.sim_worker import (
    KV_BLOCK_TOKENS,
    ActiveRequest,
    SimOutcome,
    SimRequest,
    SimWorker,
    WorkerSpec,
    decode_growth,
    kv_blocks_tokens,
)

__all__ = ["ClusterSimulation", "SimOutcome", "SimRequest", "WorkerSpec", "kv_blocks_tokens"]


class ClusterSimulation:
    """One configuration: ``colocated`` workers, or ``prefill`` + ``decode`` workers."""

    def __init__(self, model: StepTimeModel, *, colocated: int = 0, prefill: int = 0, decode: int = 0,
                 colocated_spec: WorkerSpec = WorkerSpec(), prefill_spec: WorkerSpec = WorkerSpec(),
                 decode_spec: WorkerSpec = WorkerSpec(max_batch_tokens=2048),
                 transfer_s: float | None = None, kv_bytes_per_token: float = 131072.0,
                 transfer_bytes_per_s: float = 50e9, transfer_overhead_s: float = 0.003,
                 spill_ttft_s: float | None = None) -> None:
        if colocated and (prefill or decode):
            raise ValueError("a configuration is colocated workers, or prefill + decode workers")
        if not colocated and not (prefill and decode):
            raise ValueError("a disaggregated configuration needs at least one prefill and one decode worker")
        self.model = model
        self.workers = ([SimWorker("colocated", colocated_spec, model) for _ in range(colocated)]
                        + [SimWorker("prefill", prefill_spec, model) for _ in range(prefill)]
                        + [SimWorker("decode", decode_spec, model) for _ in range(decode)])
        self._fixed_transfer_s = transfer_s
        self._kv_bytes_per_token = kv_bytes_per_token
        self._transfer_bytes_per_s = transfer_bytes_per_s
        self._transfer_overhead_s = transfer_overhead_s
        self._spill_ttft_s = spill_ttft_s
        self.num_spilled = 0
        self.num_deferred = 0  # prompt chunks put off to a later step (WorkerSpec.defer_below)
        self.num_preempted = 0  # requests that gave their KV back (WorkerSpec.kv_capacity_tokens)
        self.num_late_prompts = 0  # prompts found unable to meet their TTFT deadline (WorkerSpec.ttft_slo_s)
        self.num_dropped = 0  # requests no worker of their pool could fit

    @property
    def num_gpus(self) -> int:
        return len(self.workers)

    def transfer_s(self, prompt_tokens: int) -> float:
        if self._fixed_transfer_s is not None:
            return self._fixed_transfer_s
        return self._transfer_overhead_s + prompt_tokens * self._kv_bytes_per_token / self._transfer_bytes_per_s

    def run(self, requests: list[SimRequest]) -> list[SimOutcome]:
        """Simulate ``requests`` (any order) to completion; outcomes in the order given."""
        outcomes = [SimOutcome(r) for r in requests]
        events: list[tuple[float, int, str, object]] = []
        seq = itertools.count()
        for outcome in outcomes:
            heapq.heappush(events, (outcome.request.arrival_s, next(seq), "arrive", outcome))
        by_role = {role: [w for w in self.workers if w.role == role] for role in ("colocated", "prefill", "decode")}

        plan: list[tuple[ActiveRequest, int]]
        worker: SimWorker

        def start(worker: SimWorker, now: float) -> None:
            if worker.busy or not worker.has_work():
                return
            chunks, seconds = self._plan(worker, now)
            worker.busy = True
            heapq.heappush(events, (now + seconds, next(seq), "step", (worker, chunks)))

        while events:
            now, _, kind, payload = heapq.heappop(events)
            if kind == "arrive":
                assert isinstance(payload, SimOutcome)
                active = ActiveRequest(payload)
                if by_role["colocated"]:
                    worker = min(by_role["colocated"], key=lambda w: w.held)
                else:
                    worker = self._place_prompt(payload.request.prompt_tokens, by_role)
                worker.waiting.append(active)
                start(worker, now)
            elif kind == "kv":
                assert isinstance(payload, ActiveRequest)
                worker = min(by_role["decode"], key=lambda w: w.held)
                worker.joining.append(payload)
                start(worker, now)
            else:
                assert isinstance(payload, tuple)
                worker, plan = payload[0], payload[1]
                worker.busy = False
                self._finish_step(worker, plan, now, lambda a, t: heapq.heappush(
                    events, (t + self.transfer_s(a.outcome.request.prompt_tokens), next(seq), "kv", a)))
                if not worker.has_work():
                    worker.last_step_s = 0.0  # idle: the next step has no step in flight before it
                start(worker, now)
        return outcomes

    def _place_prompt(self, prompt_tokens: int, by_role: dict[str, list[SimWorker]]) -> SimWorker:
        """The prefill worker of fewest queued tokens, or (spilling) the decode worker that is faster."""
        prefill = min(by_role["prefill"], key=lambda w: w.queued_prompt_tokens)
        if self._spill_ttft_s is None:
            return prefill
        rate = self.model.prefill_tokens_per_s(prefill.spec.max_batch_tokens)
        remote = (prefill.queued_prompt_tokens + prompt_tokens) / rate
        if remote <= self._spill_ttft_s:
            return prefill
        fewest = min(by_role["decode"], key=lambda w: w.held)
        if fewest.spec.step_budget_s is None:
            return prefill
        # as the router: of the decode workers, the one that would finish the prompt itself soonest (the one
        # of fewest requests unless another is strictly sooner)
        decode = min(by_role["decode"], key=lambda w: (self._local_ttft_s(w, prompt_tokens), w is not fewest))
        if self._local_ttft_s(decode, prompt_tokens) < remote:
            self.num_spilled += 1
            return decode
        return prefill

    def _local_ttft_s(self, decode: SimWorker, prompt_tokens: int) -> float:
        """Seconds until ``decode`` would finish the prompt itself: its queued local prompt tokens and this
        one over the spare rate its decodes leave within its step budget."""
        assert decode.spec.step_budget_s is not None
        shape = StepShape(0)
        for a in decode.running:
            shape = shape.plus_decode(a.outcome.request.prompt_tokens + a.produced)
        spare = self.model.spare_prefill_tokens_per_s(shape, decode.spec.step_budget_s, decode.spec.max_batch_tokens,
                                                      decode.spec.min_prefill_chunk)
        return (decode.queued_prompt_tokens + prompt_tokens) / spare if spare > 0 else float("inf")

    # -- one worker ---------------------------------------------------------------------------------

    def _plan(self, worker: SimWorker, now: float) -> tuple[list[tuple[ActiveRequest, int]], float]:
        """The step a worker runs now: ``(request, prompt tokens)`` chunks (0: a decode) and its seconds."""
        spec = worker.spec
        free = float("inf") if spec.kv_capacity_tokens is None else spec.kv_capacity_tokens - worker.kv_used()
        room = max(0, spec.max_running - len(worker.running))
        joined = 0
        for a in worker.joining[:room]:  # the rest wait for room or blocks (KV held elsewhere, not decoding)
            if a.kv_tokens > free:
                a.waited_for_blocks = True
                break
            if a.waited_for_blocks:  # the engine would have started its prefill this much later
                a.outcome.first_token_s = max(a.outcome.first_token_s or now, now)
            free -= a.kv_tokens
            joined += 1
        worker.running += worker.joining[:joined]
        worker.joining = worker.joining[joined:]
        growth = sum(decode_growth(a) for a in worker.running)
        preempted = False
        while worker.running and growth > free:  # as the engine: the newest decoding request makes room
            victim = worker.running.pop()
            free += victim.kv_tokens
            growth -= decode_growth(victim)
            victim.recompute = victim.outcome.request.prompt_tokens + victim.produced
            victim.computed, victim.looked_up = 0, False
            worker.waiting.appendleft(victim)
            self.num_preempted += 1
            preempted = True
        free -= growth
        chunks: list[tuple[ActiveRequest, int]] = [(a, 0) for a in worker.running]
        shape = StepShape(0)
        for a in worker.running:
            shape = shape.plus_decode(a.outcome.request.prompt_tokens + a.produced)
        budget = spec.max_batch_tokens - len(chunks)
        budget_s = spec.step_budget_s if worker.running else None  # as the engine: no decodes, no time budget
        window_s = (window_step_budget(budget_s, spec.budget_window, worker.recent_s) if budget_s is not None
                    and all(a.outcome.request.output_tokens >= spec.budget_window for a in worker.running) else None)
        window_open = window_s is not None
        if budget_s is not None:  # as the engine: the decoding requests' slack (and what they lend)
            budget_s = self._slack_budget(worker, budget_s, now)
        if window_s is not None and budget_s is not None:
            budget_s = max(budget_s, window_s)
        prefill_taken = False
        if spec.ttft_slo_s is not None and sum(not (a.admitted or a.recompute) for a in worker.waiting) > 1:
            self._order_by_deadline(worker, spec.ttft_slo_s, now)
        for a in worker.waiting:
            if budget <= 0 or len(chunks) >= spec.max_running:  # a running batch of max_running at most
                break
            if preempted and not a.looked_up:  # as the engine: a step that preempted admits no new prompt
                continue
            if not a.looked_up:  # as the engine: the cache is consulted when the prompt is first scheduled
                a.looked_up = True
                a.computed = max(a.computed, worker.cached_prefix(a.outcome.request))
            left = a.to_compute - a.computed
            n = min(left, budget)
            if budget_s is not None:
                fits = self.model.max_chunk_tokens(shape, budget_s, n, a.computed)
                if (window_open and fits < min(n, spec.defer_below) and spec.ttft_slo_s is not None
                        and now - a.outcome.request.arrival_s < spec.ttft_slo_s * DEFER_TTFT_SHARE):
                    self.num_deferred += 1
                    break  # as the engine: the prompt (and those behind it) waits for a longer step
                if fits == 0 and not prefill_taken:
                    fits = min(n, spec.min_prefill_chunk)
                if 0 < fits < n and spec.graph_rows:  # as the engine: the step's graph computes its padding anyway
                    rows = shape.tokens + fits
                    fits = min(n, fits + padded_rows(spec.graph_rows, rows) - rows)
                n = fits
            if free != float("inf"):  # the chunk's new blocks must be free
                n = min(n, kv_blocks_tokens(a.computed) + int(free) // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS - a.computed)
            if n <= 0:
                break
            chunks.append((a, n))
            a.admitted = True
            a.outcome.prompt_steps += 1
            free -= kv_blocks_tokens(a.computed + n) - kv_blocks_tokens(a.computed)
            shape = shape.plus_chunk(n, a.computed)
            budget -= n
            prefill_taken = True
        if not chunks and not preempted and spec.kv_capacity_tokens is not None:
            self._unblock(worker)
        seconds = self.model.predict(shape)
        if spec.step_budget_s is not None:  # as the engine: every step counts
            worker.recent_s.append(seconds)
        worker.last_step_s = seconds if chunks else 0.0  # (an empty plan is not launched)
        return chunks, seconds

    def _order_by_deadline(self, worker: SimWorker, slo_s: float, now: float) -> None:
        """As the engine's scheduler: fresh prompts in deadline order behind those already admitted or
        preempted (:func:`~pdserve.common.deadline_order.deadline_order`); counts the newly late."""
        head = [a for a in worker.waiting if a.admitted or a.recompute]
        fresh = [a for a in worker.waiting if not (a.admitted or a.recompute)]
        ordered, late = deadline_order(fresh, arrival_s=lambda a: a.outcome.request.arrival_s,
                                       prompt_tokens=lambda a: a.outcome.request.prompt_tokens, slo_s=slo_s,
                                       prefill_tokens_per_s=self.model.prefill_tokens_per_s(worker.spec.max_batch_tokens),
                                       now=now)
        for a in late:
            if not a.late:
                a.late = True
                self.num_late_prompts += 1
        worker.waiting = deque(head + ordered)

    @staticmethod
    def _slack_budget(worker: SimWorker, slo_s: float, now: float) -> float:
        """As the engine's step budget (``slack_step_budget_s``: slack, and borrowing when the spec lends).
        The engine plans while the step before is in flight and allows it at least one SLO
        (``StepBudget.seconds``); planned here at that step's end, the same is the exact slack less what
        that step ran under one SLO (one SLO after an idle spell)."""
        held_back = in_flight_allowance_s(slo_s, worker.last_step_s) - worker.last_step_s
        return slack_step_budget_s(slo_s, [(a.outcome.first_token_s + slo_s * a.produced - now - held_back,
                                            a.outcome.request.output_tokens - a.produced - 1)
                                           for a in worker.running if a.outcome.first_token_s is not None],
                                   worker.spec.borrow_tokens)

    def _unblock(self, worker: SimWorker) -> None:
        """A worker with work but no step to run is out of blocks with nothing decoding: the newest partly
        computed prompt behind the request first in line gives its blocks back (preempted), or, when none
        holds any, that request cannot fit this worker at all and is dropped (no first token)."""
        head = worker.joining[0] if worker.joining else worker.waiting[0]
        others = [a for a in worker.waiting if a.computed and a is not head]
        if others:
            others[-1].computed, others[-1].looked_up = 0, False
            self.num_preempted += 1
            return
        if worker.joining:
            worker.joining.pop(0)
        else:
            worker.waiting.popleft()
        head.outcome.first_token_s = head.outcome.done_s = None
        self.num_dropped += 1

    def _finish_step(self, worker: SimWorker, plan: list[tuple[ActiveRequest, int]], now: float,
                     hand_off: Callable[[ActiveRequest, float], None]) -> None:
        for a, n in plan:
            request = a.outcome.request
            if n == 0:  # a decode: one more token
                a.produced += 1
                if a.produced >= request.output_tokens:
                    a.outcome.done_s = now
                    worker.running.remove(a)
                continue
            a.computed += n
            if a.computed < a.to_compute:
                continue
            worker.waiting.remove(a)
            worker.remember(request)
            if a.recompute:  # a preempted request computed again: it samples its next token, decodes on
                a.computed, a.recompute = request.prompt_tokens, 0
                a.produced += 1
                if a.produced >= request.output_tokens:
                    a.outcome.done_s = now
                else:
                    worker.running.append(a)
                continue
            a.produced = 1  # the prompt's last chunk samples the first token
            if worker.role == "prefill":
                a.outcome.first_token_s = now + self.transfer_s(request.prompt_tokens)  # seen once decoding
                if request.output_tokens <= 1:
                    a.outcome.done_s = a.outcome.first_token_s
                else:
                    hand_off(a, now)
                continue
            a.outcome.first_token_s = now
            if request.output_tokens <= 1:
                a.outcome.done_s = now
            else:
                worker.running.append(a)

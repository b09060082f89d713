"""SLO-aware scheduling: prefill chunks cut to the step-time budget, deadline-ordered prompt admission;
outputs are unchanged by either."""

from __future__ import annotations

import json
import time
from collections import deque

import pytest

from pdserve import LLM, SamplingParams
from pdserve.common.config import EngineConfig
from pdserve.common.deadline_order import LATE_PROMOTION_FACTOR
from pdserve.common.errors import ConfigError
from pdserve.engine.kv_cache.manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.engine.step_time import StepShape, StepTimeModel
from tests.support.two_waves import two_waves

#: requests that can only end at max_tokens: every later token can be counted on
TO_MAX = SamplingParams(max_tokens=100, ignore_eos=True)
# 5 ms per step, 0.1 ms per token past 16: a 10 ms budget leaves room for ~50 tokens beside a few decodes
MODEL = StepTimeModel(base_s=5e-3, per_token_s=1e-4, free_tokens=16)


def _scheduler(**config) -> Scheduler:
    defaults = dict(max_num_batched_tokens=512, max_num_seqs=64, step_time_budget_s=10e-3, ttft_slo_s=None)
    return Scheduler(SchedulerConfig(**{**defaults, **config}), KVCacheManager(512, 16, False), MODEL)


def _decoding(scheduler: Scheduler, n: int, params: SamplingParams | None = None) -> list[Request]:
    requests = []
    for i in range(n):
        r = Request(f"d{i}", [1] * 8, params or SamplingParams(max_tokens=100))
        scheduler.add(r)
        requests.append(r)
    plan = scheduler.schedule()
    scheduler.finish_step(plan)
    for r in requests:
        r.append_output_token(3)  # now each has one token to compute: a decode
    return requests


def test_prefill_chunk_is_cut_to_the_budget_beside_decodes() -> None:
    scheduler = _scheduler()
    _decoding(scheduler, 4)
    scheduler.add(Request("long", [2] * 400, SamplingParams(max_tokens=4)))
    plan = scheduler.schedule()
    chunk = next(c for c in plan.chunks if c.request.request_id == "long")
    assert MODEL.predict(plan.shape) <= 10e-3 < MODEL.predict(plan.shape.plus_chunk(1, chunk.num_tokens))
    assert 0 < chunk.num_tokens < 400 and scheduler.num_budget_cut_chunks == 1
    composed = StepShape(0)
    for c in plan.chunks:  # the plan's one-pass shape is the step-by-step one
        composed = composed.plus_decode(c.start) if c.num_tokens == 1 else composed.plus_chunk(c.num_tokens, c.start)
    assert plan.shape == composed and plan.shape.decodes == 4


def test_a_cut_chunk_fills_the_padding_rows_of_its_cuda_graph() -> None:
    """A step replays the CUDA graph of the next captured size up (here multiples of 64 rows), which
    computes its padding rows anyway: a chunk the budget cut grows to fill them, within the token budget;
    a chunk the budget did not cut is left as it is."""
    plain, padded = _scheduler(), _scheduler()
    padded.graph_rows = lambda n: -(-n // 64) * 64
    cut = []
    for scheduler in (plain, padded):
        _decoding(scheduler, 4)
        scheduler.add(Request("long", [2] * 400, SamplingParams(max_tokens=4)))
        cut.append(next(c.num_tokens for c in scheduler.schedule().chunks if c.request.request_id == "long"))
    assert cut[0] + 4 < 64 and cut[1] + 4 == 64  # 4 decodes + the chunk: one 64-row graph
    assert (plain.num_filled_chunks, padded.num_filled_chunks) == (0, 1)
    small = _scheduler()
    small.graph_rows = lambda n: -(-n // 64) * 64
    _decoding(small, 4)
    small.add(Request("short", [2] * 20, SamplingParams(max_tokens=4)))
    assert next(c.num_tokens for c in small.schedule().chunks if c.request.request_id == "short") == 20
    tight = _scheduler(max_num_batched_tokens=cut[0] + 4 + 2)  # room for 2 rows past the cut, not 64
    tight.graph_rows = lambda n: -(-n // 64) * 64
    _decoding(tight, 4)
    tight.add(Request("long", [2] * 400, SamplingParams(max_tokens=4)))
    assert sum(c.num_tokens for c in tight.schedule().chunks) == cut[0] + 4 + 2  # never past the token budget


def test_a_prompt_the_budget_leaves_out_may_take_the_graphs_padding_rows() -> None:
    """With ``pad_with_next_prompt``, once the budget is spent a waiting prompt still takes the padding
    rows of the step's CUDA graph (they are computed anyway), never more; without, it waits."""
    taken = []
    for pad in (False, True):
        scheduler = _scheduler()
        scheduler.graph_rows = lambda n: -(-n // 64) * 64
        scheduler.pad_with_next_prompt = pad
        _decoding(scheduler, 4)
        scheduler.add(Request("a", [2] * 46, SamplingParams(max_tokens=4)))  # 4 + 46 rows: the 10 ms budget
        scheduler.add(Request("b", [2] * 400, SamplingParams(max_tokens=4)))
        plan = scheduler.schedule()
        chunks = {c.request.request_id: c.num_tokens for c in plan.chunks if c.num_tokens > 1}
        assert chunks["a"] == 46 and MODEL.predict(StepShape(0).plus_chunk(51, 0)) > 10e-3
        taken.append((chunks.get("b", 0), plan.num_batched_tokens, scheduler.num_filled_chunks))
    assert taken == [(0, 50, 0), (14, 64, 1)]  # the 64-row graph's 14 padding rows, no more


def test_without_decodes_the_whole_token_budget_is_used() -> None:
    scheduler = _scheduler()
    scheduler.add(Request("long", [2] * 400, SamplingParams(max_tokens=4)))
    assert scheduler.schedule().chunks[0].num_tokens == 400


def test_over_budget_decodes_still_let_one_small_chunk_through() -> None:
    scheduler = _scheduler(step_time_budget_s=1e-3)  # below even the base cost
    _decoding(scheduler, 2)
    scheduler.add(Request("a", [2] * 400, SamplingParams(max_tokens=4)))
    scheduler.add(Request("b", [2] * 400, SamplingParams(max_tokens=4)))
    prompts = [c for c in scheduler.schedule().chunks if c.num_tokens > 1]
    assert [c.num_tokens for c in prompts] == [scheduler.config.min_prefill_chunk]


def test_prompts_that_cannot_meet_their_deadline_go_after_those_that_can() -> None:
    # at 1 / per_token_s = 10k tokens/s, a 4000-token prompt needs 0.4 s: it misses a 0.25 s TTFT anyway
    scheduler = _scheduler(step_time_budget_s=None, ttft_slo_s=0.25, max_num_batched_tokens=8192)
    now = time.monotonic()
    long = Request("long", [1] * 4000, SamplingParams(max_tokens=4), arrival_time=now - 0.01)
    short = Request("short", [1] * 100, SamplingParams(max_tokens=4), arrival_time=now)
    old = Request("old", [1] * 4000, SamplingParams(max_tokens=4),
                  arrival_time=now - LATE_PROMOTION_FACTOR * 0.25 - 0.1)  # waited too long: goes first
    for r in (long, short, old):
        scheduler.add(r)
    scheduler._order_by_deadline()
    assert [r.request_id for r in scheduler.waiting] == ["old", "short", "long"]
    assert long.deadline_missed and not short.deadline_missed and scheduler.num_late_prompts == 1


def test_landing_zones_open_ahead_of_local_prompts_that_wait_for_step_budget() -> None:
    # decodes leave no budget: one local prompt gets the minimum chunk, the next waits; the remote
    # prompts queued behind them (one by arrival, one behind both) get their landing zones now anyway
    scheduler = _scheduler(step_time_budget_s=1e-3, ttft_slo_s=0.25)
    _decoding(scheduler, 2)
    now = time.monotonic()
    for i, remote in enumerate([False, True, False, True]):
        scheduler.add(Request(f"p{i}", [2] * 300, SamplingParams(max_tokens=4), arrival_time=now + i * 1e-3,
                              remote_prefill=remote))
    plan = scheduler.schedule()
    assert [r.request_id for r in plan.landing_zones] == ["p1", "p3"]
    assert [c.request.request_id for c in plan.chunks if c.num_tokens > 1] == ["p0"]
    assert [r.request_id for r in scheduler.waiting] == ["p2"]
    assert set(scheduler.waiting_for_kv) == {"p1", "p3"}


def test_landing_zones_open_when_decodes_use_the_whole_token_budget() -> None:
    scheduler = _scheduler(max_num_batched_tokens=4, step_time_budget_s=None)
    _decoding(scheduler, 4)
    scheduler.add(Request("remote", [2] * 40, SamplingParams(max_tokens=4), remote_prefill=True))
    plan = scheduler.schedule()
    assert [r.request_id for r in plan.landing_zones] == ["remote"] and plan.num_batched_tokens == 4


def test_landing_zones_wait_behind_a_preempted_request() -> None:
    # blocks for one 200-token prompt only: the preempted request (head of the queue) gets them, the
    # landing zone that arrived later waits; without the preempted request the zone gets them
    for with_preempted in (True, False):
        scheduler = _scheduler()
        hog = Request("hog", [2] * 16 * (scheduler.kv.num_free_blocks - 14), SamplingParams(max_tokens=4))
        assert scheduler.kv.allocate_slots(hog, hog.num_tokens)
        if with_preempted:
            preempted = Request("pre", [2] * 200, SamplingParams(max_tokens=4))
            scheduler._preempt(preempted)
        scheduler.add(Request("remote", [2] * 200, SamplingParams(max_tokens=4), remote_prefill=True))
        plan = scheduler.schedule()
        if with_preempted:
            assert [c.request.request_id for c in plan.chunks] == ["pre"] and not plan.landing_zones
            assert [r.request_id for r in scheduler.waiting] == ["remote"]
        else:
            assert [r.request_id for r in plan.landing_zones] == ["remote"]


def test_slo_scheduling_leaves_outputs_unchanged(tmp_path) -> None:
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(MODEL.to_dict()))
    prompts = ["Hello there " * 20, "The capital of France is", "x" * 150, "Once upon a time " * 8, "zzz"]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    plain = two_waves(LLM(model="tiny-random", num_kv_blocks=256), prompts, params)
    budgeted = LLM(model="tiny-random", num_kv_blocks=256, step_time_profile=str(profile), step_time_budget_ms=6.0,
                   ttft_slo_ms=1.0)
    assert two_waves(budgeted, prompts, params) == plain
    engine = budgeted.engine
    assert engine.scheduler.num_budget_cut_chunks > 0  # prompts were chunked beside decodes
    assert engine.step_monitor is not None and engine.step_monitor.summary()["steps"] > 0
    assert 0 < engine.spare_prefill_tokens_per_s() <= engine.prefill_tokens_per_s
    deferring = LLM(model="tiny-random", num_kv_blocks=256, step_time_profile=str(profile), step_time_budget_ms=6.0,
                    ttft_slo_ms=200.0, step_budget_window=4, defer_chunks_below=64)
    assert two_waves(deferring, prompts, params) == plain
    assert deferring.engine.scheduler.num_deferred_chunks > 0  # chunks waited for a longer step
    borrowing = LLM(model="tiny-random", num_kv_blocks=256, step_time_profile=str(profile), step_time_budget_ms=6.0,
                    step_budget_borrow_tokens=64)
    assert two_waves(borrowing, prompts, params) == plain
    padded = LLM(model="tiny-random", num_kv_blocks=256, step_time_profile=str(profile), step_time_budget_ms=6.0)
    padded.engine.scheduler.graph_rows = lambda n: -(-n // 16) * 16  # as if steps replayed 16-row graphs
    padded.engine.scheduler.pad_with_next_prompt = True
    assert two_waves(padded, prompts, params) == plain
    assert padded.engine.scheduler.num_filled_chunks > 0


def test_decodes_ahead_of_their_tpot_let_a_longer_chunk_through() -> None:
    """TPOT is a mean per request: requests whose tokens came faster than the SLO have slack, and the
    step may spend the batch's least slack (less one SLO for the step in flight)."""
    fresh = _scheduler()
    _decoding(fresh, 4)
    assert fresh.step_budget() == 10e-3  # a first token just now: no slack yet
    ahead = _scheduler()
    for request in _decoding(ahead, 4):
        request.first_token_time = time.monotonic() - 0.1  # 1 token in 100 ms: far ahead of 10 ms/token
        for _ in range(19):
            request.append_output_token(3)  # 20 tokens: 200 ms allowed, 100 ms used
        request.num_computed_tokens = request.num_tokens - 1  # all but the newest token have KV
    budget = ahead.step_budget()
    assert budget is not None and 0.08 < budget < 0.1
    ahead.in_flight_s = 0.07  # a long step (that slack paid for) still on the device: 70 ms of it is spent
    spent = ahead.step_budget()
    assert spent is not None and budget - 0.07 + 0.01 == pytest.approx(spent, abs=2e-3)
    ahead.in_flight_s = 0.004  # a short one: one SLO is allowed for it, as before
    assert ahead.step_budget() == pytest.approx(budget, abs=2e-3)
    cuts = []
    for scheduler in (fresh, ahead):
        scheduler.add(Request("long", [2] * 400, SamplingParams(max_tokens=4)))
        plan = scheduler.schedule()
        cuts.append(next(c.num_tokens for c in plan.chunks if c.request.request_id == "long"))
        assert plan.predicted_s == pytest.approx(MODEL.predict(plan.shape))  # what the next plan allows for
    assert cuts[0] < cuts[1] == 400


def test_borrowing_from_later_tokens_lets_a_fresh_batch_take_a_whole_prompt() -> None:
    """With ``borrow_tokens`` B, each decoding request lends the next step its slack plus what B of its later
    tokens pay back at 0.8 of the SLO (0.2 x 10 ms each), at most six SLOs in all; the least lender sets
    the budget, never below the SLO, and a request near its ``max_tokens`` or behind its pace lends less."""
    fresh = _scheduler(borrow_tokens=64)
    _decoding(fresh, 4, TO_MAX)  # no slack, 98 tokens left each: 64 x 2 ms = 128 ms, capped at 60 ms
    assert fresh.step_budget() == pytest.approx(60e-3, abs=1e-3)
    assert _scheduler().config.borrow_tokens == 0  # off unless configured
    few = _scheduler(borrow_tokens=64)
    for request in _decoding(few, 4, TO_MAX)[:1]:
        request.params = SamplingParams(max_tokens=22, ignore_eos=True)  # 20 tokens after the next: 40 ms to lend
    assert few.step_budget() == pytest.approx(40e-3, abs=1e-3)
    behind = _scheduler(borrow_tokens=8)
    late = _decoding(behind, 4, TO_MAX)[0]
    late.first_token_time = time.monotonic() - 5e-3  # 5 ms behind the SLO's pace: 16 - 5 ms
    assert behind.step_budget() == pytest.approx(11e-3, abs=1e-3)
    late.first_token_time = time.monotonic() - 50e-3  # more behind than its later tokens repay: the SLO
    assert behind.step_budget() == pytest.approx(10e-3)
    cuts = []
    for scheduler in (_scheduler(), fresh):
        if scheduler is not fresh:
            _decoding(scheduler, 4, TO_MAX)
        scheduler.add(Request("long", [2] * 400, SamplingParams(max_tokens=4)))
        cuts.append(next(c.num_tokens for c in scheduler.schedule().chunks if c.request.request_id == "long"))
    assert cuts[0] < cuts[1] == 400  # 400 tokens beside 4 decodes: ~44 ms predicted, within 60


def test_a_request_that_may_stop_early_lends_what_finished_requests_say() -> None:
    """A request that may stop at EOS is counted on for the later tokens that three in four finished
    requests of at least its length went on to produce (none until 16 of them finished; ``min_tokens``
    always); aborted requests and requests that can only end at ``max_tokens`` teach nothing."""
    scheduler = _scheduler(borrow_tokens=64)
    (request,) = _decoding(scheduler, 1)  # max_tokens 100, may stop early; 1 token so far
    assert scheduler.output_lengths.tokens_left(request, 1) == 0
    assert scheduler.step_budget() == pytest.approx(10e-3)  # nothing to lend yet: the SLO
    assert (lengths := scheduler.output_lengths) is scheduler.budget.output_lengths
    for i in range(40):  # finished outputs of 11, 12, ..., 50 tokens
        done = Request(f"f{i}", [1] * 4, SamplingParams(max_tokens=100))
        for _ in range(11 + i):
            done.append_output_token(3)
        scheduler.finish(done, RequestStatus.FINISHED_STOPPED)
    aborted = Request("a", [1] * 4, SamplingParams(max_tokens=100))
    aborted.append_output_token(3)
    scheduler.finish(aborted, RequestStatus.FINISHED_ABORTED)
    exact = Request("x", [1] * 4, TO_MAX)
    exact.append_output_token(3)
    scheduler.finish(exact, RequestStatus.FINISHED_LENGTH)
    assert len(lengths) == 40
    # after 1 token: all 40 got as far; their 25% quantile is 20 tokens, 18 of them after the next
    assert lengths.tokens_left(request, 1) == 18
    request.first_token_time = time.monotonic()  # no slack, no debt: 18 x 2 ms to lend
    assert scheduler.step_budget() == pytest.approx(10e-3 * 0.2 * 18, abs=1e-3)
    assert lengths.tokens_left(request, 30) == 4  # 20 got as far as 31: their 25% quantile is 35
    assert lengths.tokens_left(request, 40) == 0  # 10 got as far as 41: too few to count on
    request.params = SamplingParams(max_tokens=100, min_tokens=30)
    assert lengths.tokens_left(request, 1) == 28  # min_tokens is guaranteed
    assert lengths.tokens_left(Request("y", [1], TO_MAX), 1) == 98


def test_borrowing_is_validated() -> None:
    with pytest.raises(ConfigError, match="step_budget_borrow_tokens"):
        EngineConfig(step_budget_borrow_tokens=-1)
    assert EngineConfig(step_budget_borrow_tokens=64).step_budget_borrow_tokens == 64


def _without_slack(request: Request) -> None:
    """Make ``request``'s tokens so far have come exactly at the SLO (10 ms each): no slack of its own."""
    produced = request.num_output_tokens + request.num_pending_tokens
    request.first_token_time = time.monotonic() - 10e-3 * (produced - 1)


def _run_decode_steps(scheduler: Scheduler, requests: list[Request], steps: int) -> None:
    for _ in range(steps):
        plan = scheduler.schedule()
        scheduler.finish_step(plan)
        for r in requests:
            r.append_output_token(3)


def test_a_window_of_fast_steps_lets_a_fresh_batch_take_a_longer_step() -> None:
    """With ``budget_window`` W, a step may take what keeps the mean predicted time of the last W steps
    within the SLO (capped), even for requests that have no slack of their own yet."""
    windowed = _scheduler(budget_window=8)
    requests = _decoding(windowed, 4)
    assert windowed.step_budget() == 10e-3  # no window of steps behind it yet
    _run_decode_steps(windowed, requests, 7)  # 4 decodes: ~5 ms each, the window is full
    for r in requests:
        _without_slack(r)  # and no request has slack of its own
    fast = sum(windowed.budget.recent_s)
    assert len(windowed.budget.recent_s) == 7 and fast < 7 * 10e-3
    budget = windowed.step_budget()
    assert budget is not None and budget == min(8 * 10e-3 - fast, 4 * 10e-3) > 10e-3
    windowed.add(Request("long", [2] * 400, SamplingParams(max_tokens=4)))
    plan = windowed.schedule()
    chunk = next(c for c in plan.chunks if c.request.request_id == "long")
    assert 10e-3 < MODEL.predict(plan.shape) <= budget
    # the long step now counts: the next step is back near the SLO
    next_budget = windowed.step_budget()
    assert next_budget is not None and next_budget < budget and chunk.num_tokens > 50


def test_the_window_budget_spares_requests_shorter_than_the_window() -> None:
    short = _scheduler(budget_window=8)
    requests = _decoding(short, 2)
    _run_decode_steps(short, requests, 7)
    for r in requests:
        _without_slack(r)
    assert short.step_budget() > 10e-3
    ending = Request("ending", [1] * 8, SamplingParams(max_tokens=4))  # fewer tokens in all than the window
    short.add(ending)
    short.finish_step(short.schedule())
    ending.append_output_token(3)
    for r in (*requests, ending):
        _without_slack(r)
    assert short.step_budget() == pytest.approx(10e-3, abs=1e-4)
    assert _scheduler().config.budget_window == 0  # off unless configured


def test_a_chunk_the_budget_would_cut_short_waits_for_a_longer_step_while_it_can() -> None:
    """``defer_chunks_below``: with the window open, a prompt whose chunk would be cut below N tokens
    waits (the decode-only steps meanwhile make room); once it waited a quarter of its TTFT SLO it is
    cut as without the option; with room in the window it goes whole."""
    def scheduler_with(recent_s: float) -> tuple[Scheduler, list[Request]]:
        scheduler = _scheduler(budget_window=8, defer_chunks_below=256, ttft_slo_s=0.25)
        requests = _decoding(scheduler, 4)
        _run_decode_steps(scheduler, requests, 7)
        for r in requests:
            _without_slack(r)
        assert scheduler.budget is not None
        scheduler.budget.recent_s = deque([recent_s] * 7, maxlen=7)  # the last steps' predicted times
        return scheduler, requests

    full, _ = scheduler_with(10e-3)  # the window is spent: the budget is the SLO, ~50 tokens beside 4 decodes
    full.add(Request("long", [2] * 400, SamplingParams(max_tokens=4)))
    assert [c.request.request_id for c in full.schedule().chunks if c.num_tokens > 1] == []
    assert full.num_deferred_chunks == 1 and full.num_budget_cut_chunks == 0
    waited, _ = scheduler_with(10e-3)
    waited.add(Request("long", [2] * 400, SamplingParams(max_tokens=4), arrival_time=time.monotonic() - 0.1))
    chunk = next(c for c in waited.schedule().chunks if c.num_tokens > 1)
    assert 0 < chunk.num_tokens < 256 and waited.num_deferred_chunks == 0  # urgent: cut, not deferred
    roomy, _ = scheduler_with(5e-3)  # fast steps behind: 40 ms of room, 350 tokens fit
    roomy.add(Request("long", [2] * 400, SamplingParams(max_tokens=4)))
    chunk = next(c for c in roomy.schedule().chunks if c.num_tokens > 1)
    assert chunk.num_tokens >= 256 and roomy.num_deferred_chunks == 0


def test_deferring_chunks_needs_the_window() -> None:
    with pytest.raises(ConfigError, match="step_budget_window"):
        EngineConfig(defer_chunks_below=512)
    assert EngineConfig(defer_chunks_below=512, step_budget_window=16).defer_chunks_below == 512

"""Scheduler policy in token counts: budgets, decode-first, admission limits, preemption order."""

from __future__ import annotations

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.kv_cache.manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.engine.step_plan import SchedulerPlan


def _scheduler(budget: int = 16, max_seqs: int = 8, blocks: int = 64, chunked: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_seqs, chunked), KVCacheManager(blocks, block_size=4))


def _req(rid: str, n: int) -> Request:
    """A request whose tokens share no prefix with any other request's."""
    base = 1000 * (sum(map(ord, rid)) + 1)
    return Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=100))


def _step(s: Scheduler) -> SchedulerPlan:
    """Schedule, pretend the model ran, and sample token 1 for every chunk that samples."""
    plan = s.schedule()
    s.finish_step(plan)
    for c in plan.chunks:
        if c.samples:
            c.request.append_output_token(1)
    s.kv.check_invariants()
    return plan


def test_chunked_prefill_respects_the_budget() -> None:
    s = _scheduler(budget=16)
    a, b = _req("a", 30), _req("b", 5)
    s.add(a)
    s.add(b)
    plan = _step(s)
    assert [(c.request.request_id, c.num_tokens) for c in plan.chunks] == [("a", 16)]
    plan = _step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("a", 16, 14), ("b", 0, 2)]
    assert plan.chunks[0].samples and not plan.chunks[1].samples
    plan = _step(s)  # a decodes first, then b finishes its prompt
    assert [(c.request.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 3)]


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    s = _scheduler(budget=16, chunked=False)
    s.add(_req("a", 10))
    s.add(_req("b", 10))
    assert [c.request.request_id for c in _step(s).chunks] == ["a"]
    assert [(c.request.request_id, c.num_tokens) for c in _step(s).chunks] == [("a", 1), ("b", 10)]


def test_max_num_seqs_limits_admission() -> None:
    s = _scheduler(budget=100, max_seqs=2)
    for i in range(4):
        s.add(_req(f"r{i}", 3))
    assert len(_step(s).chunks) == 2
    assert len(s.running) == 2 and len(s.waiting) == 2


def test_preemption_takes_the_latest_admitted_and_requeues_it_first() -> None:
    s = _scheduler(budget=64, blocks=7)  # 6 usable blocks of 4 tokens
    a, b, c = _req("a", 8), _req("b", 8), _req("c", 8)
    for r in (a, b, c):
        s.add(r)
    _step(s)  # a and b admitted (2 blocks each + room), c does not fit: 6 blocks, c needs 2 -> fits too
    assert {r.request_id for r in s.running} == {"a", "b", "c"}
    # every request now needs a 3rd block for token 9; only the first two get one
    plan = _step(s)
    assert [r.request_id for r in plan.preempted] == ["c"]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert s.waiting[0] is c
    assert not s.kv.has_blocks("c")


def test_finish_frees_exactly_once() -> None:
    s = _scheduler()
    a = _req("a", 5)
    s.add(a)
    _step(s)
    free_before = s.kv.num_free_blocks
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == free_before + 2
    assert not s.has_unfinished()
    s.kv.check_no_leaks()

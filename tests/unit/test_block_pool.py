"""Block pool and KV cache manager: allocation, ref counts, LRU eviction, prefix lookups, invariants."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.kv_cache.block_hash import extend_block_hashes, hash_block
from pdserve.engine.kv_cache.block_pool import BlockPool
from pdserve.engine.kv_cache.manager import KVCacheManager
from pdserve.engine.request import Request


def test_null_block_is_never_handed_out() -> None:
    pool = BlockPool(5)
    blocks = pool.allocate(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.check_invariants()


def test_double_free_is_caught() -> None:
    pool = BlockPool(4)
    [block] = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([block])


def test_lru_eviction_order_and_hits() -> None:
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    for block, h in ((a, b"a"), (b, b"b"), (c, b"c")):
        pool.cache_block(block, h)
    pool.free([c, b, a])  # c freed first -> evicted first
    assert pool.lookup(b"b") is b
    pool.touch([b])  # a hit revives b out of the free queue
    assert pool.num_free_blocks == 2
    [x] = pool.allocate(1)
    assert x is c and pool.lookup(b"c") is None and pool.num_evictions == 1
    assert pool.lookup(b"a") is a
    pool.check_invariants()


def test_cache_block_is_write_once_and_first_writer_wins() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"h")
    pool.cache_block(b, b"h")  # duplicate content: index keeps a
    assert pool.lookup(b"h") is a and b.block_hash is None
    with pytest.raises(RuntimeError):
        pool.cache_block(a, b"other")
    pool.check_invariants()


def test_reset_prefix_cache_only_when_idle() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"a")
    assert not pool.reset_prefix_cache()  # blocks in use
    pool.free([b, a])
    assert pool.reset_prefix_cache()
    assert pool.lookup(b"a") is None and a.block_hash is None
    pool.check_invariants()


def test_block_hashes_chain_over_prefixes() -> None:
    h1: list[bytes] = []
    h2: list[bytes] = []
    extend_block_hashes(h1, [1, 2, 3, 4, 5, 6, 7], 2)
    extend_block_hashes(h2, [1, 2, 9, 4, 5, 6], 2)
    assert len(h1) == 3 and len(h2) == 3
    assert h1[0] == h2[0] and h1[1] != h2[1] and h1[2] != h2[2]  # a change poisons every later block
    assert h1[0] == hash_block(None, [1, 2])


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_manager_prefix_hits_leave_one_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = _request("a", list(range(12)))
    assert kv.allocate_slots(first, 12)
    first_blocks = kv.block_ids("a")
    first.num_computed_tokens = 12
    kv.cache_full_blocks(first)
    kv.free(first)
    same = _request("b", list(range(12)))
    hits = kv.find_cached_prefix(same)
    assert len(hits) == 2  # 3 full blocks cached, but the last token must be computed
    assert [b.block_id for b in hits] == first_blocks[:2]
    longer = _request("c", list(range(13)))
    assert len(kv.find_cached_prefix(longer)) == 3
    assert kv.allocate_slots(longer, 1, kv.find_cached_prefix(longer))
    assert kv.block_ids("c")[:3] == first_blocks and len(kv.block_ids("c")) == 4
    kv.check_invariants()
    kv.free(longer)
    kv.check_no_leaks()


def test_allocate_is_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=4)
    big = _request("big", list(range(20)))
    assert not kv.allocate_slots(big, 20)
    assert kv.num_free_blocks == 4 and not kv.has_blocks("big")
    kv.check_invariants()


class PoolMachine(RuleBasedStateMachine):
    """Random sequences of admissions, growth, caching and frees keep every invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_blocks=24, block_size=2)
        self.live: dict[str, Request] = {}
        self.counter = 0

    @rule(length=st.integers(1, 20), prefix=st.sampled_from([[], [7, 7], [7, 7, 8, 8], [1, 2, 3, 4, 5, 6]]),
          seed=st.integers(0, 3))
    def admit(self, length: int, prefix: list[int], seed: int) -> None:
        tokens = (prefix + [seed] * length)[: max(1, len(prefix) + length)]
        request = _request(f"r{self.counter}", tokens)
        self.counter += 1
        hits = self.kv.find_cached_prefix(request)
        if self.kv.allocate_slots(request, request.num_tokens - len(hits) * 2, hits):
            request.num_computed_tokens = request.num_tokens
            self.kv.cache_full_blocks(request)
            self.live[request.request_id] = request

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 5))
    def grow(self, data: st.DataObject, n: int) -> None:
        request = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if self.kv.allocate_slots(request, n):
            for _ in range(n):
                request.append_output_token(3)
            request.num_computed_tokens = request.num_tokens
            self.kv.cache_full_blocks(request)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        request = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.kv.free(request)

    @invariant()
    def consistent(self) -> None:
        self.kv.check_invariants()
        if not self.live:
            self.kv.check_no_leaks()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)

"""Per-request block tables on top of the :class:`BlockPool`, and prefix-cache lookups.

Contract with the scheduler:

* ``find_cached_prefix(request)`` (for a request with no KV yet) returns blocks already holding a prefix
  of its tokens; it changes nothing (``record_prefix_lookup`` counts it once the request is admitted).
* ``allocate_slots(request, n, cached_prefix)`` makes room for ``n`` more tokens after the request's
  ``num_computed_tokens`` plus the cached prefix; it either succeeds completely or changes nothing. The
  caller then advances ``num_computed_tokens`` past the cached prefix.
* ``cache_full_blocks(request)`` after ``num_computed_tokens`` advanced: full blocks enter the index.
* ``free(request)`` exactly once when the request finishes or is preempted.

The block tables are the only holders of block references, which :meth:`check_invariants` verifies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pdserve.engine.kv_cache.block_hash import extend_block_hashes
from pdserve.engine.kv_cache.block_pool import BlockPool, KVBlock
from pdserve.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._tables: dict[str, list[KVBlock]] = {}
        self._ids: dict[str, list[int]] = {}  # the same tables as plain ids, kept in step (hot path)
        self._num_cached_blocks: dict[str, int] = {}
        self.prefix_queries_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- queries -------------------------------------------------------------------------------

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block ids in order. A live view: valid until the request's next allocation."""
        return self._ids.get(request_id, [])

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._tables

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_requests(self) -> int:
        return len(self._tables)

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Longest run of cached full blocks matching the request's first tokens.

        At least one token is always left to compute, since a step must produce logits to sample from.
        """
        if not self.enable_prefix_caching or request.num_computed_tokens:
            return []
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix lookup (for the hit-rate metric)."""
        self.prefix_queries_tokens += num_tokens
        self.prefix_hit_tokens += num_hit_tokens

    # ---- mutations -----------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       cached_prefix: Sequence[KVBlock] = ()) -> bool:
        table = self._tables.get(request.request_id, [])
        if not cached_prefix and request.num_computed_tokens + num_new_tokens <= len(table) * self.block_size:
            return True  # the common decode step: the last block still has room
        if cached_prefix and table:
            raise RuntimeError(f"request {request.request_id} already has blocks; a cached prefix only "
                               f"applies at first admission")
        total_tokens = request.num_computed_tokens + len(cached_prefix) * self.block_size + num_new_tokens
        num_new_blocks = max(0, self.blocks_for_tokens(total_tokens) - len(table) - len(cached_prefix))
        num_revived = sum(1 for b in cached_prefix if b.ref_count == 0)  # leave the free queue on touch
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(cached_prefix)
        new_blocks = self.pool.allocate(num_new_blocks)
        table.extend(cached_prefix)
        table.extend(new_blocks)
        self._tables[request.request_id] = table
        ids = self._ids.setdefault(request.request_id, [])
        ids.extend(b.block_id for b in cached_prefix)
        ids.extend(b.block_id for b in new_blocks)
        self._num_cached_blocks.setdefault(request.request_id, len(cached_prefix))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Index every full block whose KV is computed and that is not indexed yet."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request.request_id]
        # a token still in flight has KV but no id on the host yet: it cannot be hashed
        known = min(request.num_computed_tokens, request.num_known_tokens)
        num_full = min(known // self.block_size, len(table))
        done = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= done:
            return
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        for j in range(done, num_full):
            self.pool.cache_block(table[j], request.block_hashes[j])
        self._num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first, so its tail is evicted before shared heads)."""
        table = self._tables.pop(request.request_id, None)
        self._ids.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if table is not None:
            self.pool.free(reversed(table))

    # ---- checks --------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        refs = Counter(b.block_id for table in self._tables.values() for b in table)
        for block in self.pool.blocks:
            assert block.ref_count == refs.get(block.block_id, 0), (
                f"block {block.block_id}: ref_count {block.ref_count} but {refs.get(block.block_id, 0)} "
                f"block-table references")
        for request_id, table in self._tables.items():
            assert len({b.block_id for b in table}) == len(table), f"request {request_id} lists a block twice"
            assert self._ids[request_id] == [b.block_id for b in table], f"request {request_id}: id view stale"
        assert self._ids.keys() == self._tables.keys(), "id views and tables disagree"

    def check_no_leaks(self) -> None:
        """With no request holding blocks, every usable block must be free."""
        assert not self._tables, f"requests still hold blocks: {sorted(self._tables)}"
        assert self.pool.num_free_blocks == self.pool.num_usable_blocks, "blocks leaked"

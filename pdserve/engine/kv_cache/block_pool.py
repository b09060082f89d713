"""The pool of KV blocks: allocation, reference counts and the prefix cache's index. Pure Python.

Lifecycle of a block: *free* (ref count 0, in the free queue; it may still hold cached content) ->
*in use* (ref count >= 1, out of the queue) -> back to the queue when its last user frees it. The free
queue is ordered least-recently-freed first; :meth:`allocate` takes from its head, so the cached content
evicted first is the one unused for longest (LRU). A cache hit on a free block takes it out of the queue
(O(1): the queue is an ``OrderedDict`` keyed by block id, a linked list underneath).

A block's hash is written once, when the block becomes full with computed KV (:meth:`cache_block`), and
cleared only when the block is evicted for reuse. Block 0 is the *null block*: never handed out, it is
where padded or dropped writes may land.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    NULL_BLOCK_ID = 0

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (free ones, including those holding evictable cached content)."""
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by some request."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_prefix_caching else None

    # ---- mutations -----------------------------------------------------------------------------

    def allocate(self, n: int) -> list[KVBlock]:
        """Take ``n`` free blocks (evicting their cached content), each with ref count 1."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free; check num_free_blocks first")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to each block (prefix-cache hits); free ones leave the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference from each block, in order; blocks reaching zero join the queue's tail.

        Pass a request's blocks last-first so that its tail blocks (least likely to be shared) are
        evicted before its head blocks.
        """
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Record that ``block`` holds the full block with ``block_hash`` (write-once).

        If another block already holds the same content, the index keeps that one; this block stays
        uncached and is recycled normally when freed.
        """
        if not self.enable_prefix_caching or block.block_hash is not None:
            if block.block_hash not in (None, block_hash):
                raise RuntimeError(f"block {block.block_id} already cached under another hash")
            return
        if block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget all cached content; only possible when no block is in use. Returns success."""
        if len(self._free) != self.num_usable_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        return True

    # ---- checks --------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. Cheap enough for every test."""
        null = self.blocks[self.NULL_BLOCK_ID]
        assert null.ref_count == 0 and null.block_hash is None, "the null block was handed out"
        assert self.NULL_BLOCK_ID not in self._free, "the null block is in the free queue"
        for block in self.blocks[1:]:
            assert block.ref_count >= 0, f"block {block.block_id} has negative ref count"
            in_queue = block.block_id in self._free
            assert in_queue == (block.ref_count == 0), (
                f"block {block.block_id}: ref_count={block.ref_count} but in_free_queue={in_queue}")
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, f"block {block.block_id} hash not indexed"
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, f"index entry for block {block.block_id} is stale"
        for block_id, block in self._free.items():
            assert self.blocks[block_id] is block, f"free queue entry {block_id} is not the pool's block"


"""Chained content hashes of full KV blocks, the keys of the prefix cache.

The hash of block ``j`` covers its tokens and the hash of block ``j-1``, so equal hashes mean equal
whole prefixes. Hashes are stable across processes and machines (blake2b over fixed-width token
bytes), so a router can compute the same keys to route by prefix overlap.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = b"pdserve-kv-v1"


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent or ROOT_HASH, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int) -> None:
    """Append the hashes of full blocks of ``token_ids`` past those already in ``hashes`` (in place)."""
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[start:start + block_size]))

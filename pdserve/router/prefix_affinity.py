"""Prefix affinity: remember which prompt prefixes each worker has seen, so a request can go where its
prefix is probably still in the KV cache (cache-aware routing, as SGLang's router and Dynamo's KV
router do).

The router does not see the workers' caches. It approximates them: a prompt is cut into fixed blocks
(``BLOCK_TOKENS`` token ids, or ``BLOCK_BYTES`` bytes of text: the router has no tokenizer), each block
gets a chained hash (so one key names the whole prefix up to it), and every worker keeps an LRU set of
the keys of the prompts sent to it, bounded by ``capacity`` keys. :meth:`PrefixIndex.matched` is the
number of leading blocks of a prompt a worker has seen. The policies turn it into a score bonus
(``RouterConfig.prefix_affinity_weight``), which the load terms still outweigh on a busy worker.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from pdserve.v1 import worker_pb2

BLOCK_TOKENS = 16
BLOCK_BYTES = 64
DEFAULT_CAPACITY = 1 << 17  # keys per worker: ~2M tokens of prompts


def prefix_keys(submit: worker_pb2.SubmitRequest) -> list[bytes]:
    """The chained block keys of the prompt of ``submit`` (full blocks only; [] for a short prompt)."""
    if submit.HasField("prompt_token_ids") and submit.prompt_token_ids.ids:
        ids = list(submit.prompt_token_ids.ids)
        blocks = [b"t" + b"".join(t.to_bytes(8, "little", signed=True) for t in ids[i:i + BLOCK_TOKENS])
                  for i in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS)]
    else:
        if submit.HasField("chat"):
            text = "".join(f"{m.role}\0{m.content}\0" for m in submit.chat.messages)
        else:
            text = submit.prompt_text
        data = text.encode()
        blocks = [b"s" + data[i:i + BLOCK_BYTES] for i in range(0, len(data) - BLOCK_BYTES + 1, BLOCK_BYTES)]
    keys, previous = [], b""
    for block in blocks:
        previous = hashlib.blake2b(previous + block, digest_size=16).digest()
        keys.append(previous)
    return keys


class PrefixIndex:
    """Per worker, an LRU set of the prefix keys sent to it. Single event loop, not thread-safe."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._seen: dict[str, OrderedDict[bytes, None]] = {}

    def matched(self, worker_id: str, keys: Sequence[bytes]) -> int:
        """How many leading blocks of ``keys`` ``worker_id`` has seen (chained keys: the longest hit)."""
        seen = self._seen.get(worker_id)
        if not seen:
            return 0
        for i in range(len(keys) - 1, -1, -1):
            if keys[i] in seen:
                return i + 1
        return 0

    def record(self, worker_id: str, keys: Sequence[bytes]) -> None:
        """``worker_id`` received a prompt with ``keys``: they become its most recent."""
        if not keys:
            return
        seen = self._seen.setdefault(worker_id, OrderedDict())
        for key in keys:
            seen[key] = None
            seen.move_to_end(key)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, worker_id: str) -> None:
        """Drop what ``worker_id`` was sent (it restarted or was lost: its cache is gone)."""
        self._seen.pop(worker_id, None)

    def bonus(self, workers: Sequence[str], keys: Sequence[bytes], weight: float) -> dict[str, float]:
        """``weight`` x the fraction of the prompt's blocks each worker has seen ({} without keys)."""
        if not keys or weight <= 0:
            return {}
        return {w: weight * self.matched(w, keys) / len(keys) for w in workers}

"""Prefix affinity: chained prefix keys, the per-worker LRU index, and routing with it (fake workers)."""

from __future__ import annotations

import pytest

from pdserve.router.prefix_affinity import BLOCK_BYTES, BLOCK_TOKENS, PrefixIndex, prefix_keys
from pdserve.v1 import worker_pb2
from tests.unit.test_router_fakes import FakeWorker, cluster, generate_request, run


def _tokens(ids: list[int]) -> worker_pb2.SubmitRequest:
    submit = worker_pb2.SubmitRequest()
    submit.prompt_token_ids.ids.extend(ids)
    return submit


def test_keys_name_whole_prefixes() -> None:
    shared = list(range(3 * BLOCK_TOKENS))
    a, b = prefix_keys(_tokens(shared + [1] * BLOCK_TOKENS)), prefix_keys(_tokens(shared + [2] * BLOCK_TOKENS))
    assert len(a) == len(b) == 4 and a[:3] == b[:3] and a[3] != b[3]
    assert prefix_keys(_tokens(list(range(BLOCK_TOKENS - 1)))) == []  # no full block
    # chained: the same block after another prefix is another key
    assert prefix_keys(_tokens([5] * BLOCK_TOKENS + shared[:BLOCK_TOKENS]))[1] != a[0]
    text = worker_pb2.SubmitRequest(prompt_text="x" * (2 * BLOCK_BYTES + 3))
    assert len(prefix_keys(text)) == 2
    chat = worker_pb2.SubmitRequest()
    chat.chat.messages.add(role="user", content="y" * BLOCK_BYTES)
    assert len(prefix_keys(chat)) == 1 and prefix_keys(chat) != prefix_keys(text)[:1]


def test_index_matches_the_longest_seen_prefix_and_forgets() -> None:
    index = PrefixIndex(capacity=6)
    keys = prefix_keys(_tokens(list(range(4 * BLOCK_TOKENS))))
    index.record("w0", keys[:2])
    assert index.matched("w0", keys) == 2 and index.matched("w1", keys) == 0
    assert index.bonus(["w0", "w1"], keys, 0.5) == {"w0": 0.25, "w1": 0.0}
    assert index.bonus(["w0"], [], 0.5) == {} and index.bonus(["w0"], keys, 0.0) == {}
    index.record("w0", prefix_keys(_tokens([9] * (5 * BLOCK_TOKENS))))  # 5 new keys: capacity 6 evicts keys[0]
    assert index.matched("w0", keys) == 2  # keys[1] names the 2-block prefix on its own
    index.record("w0", prefix_keys(_tokens([8] * BLOCK_TOKENS)))  # and now keys[1]
    assert index.matched("w0", keys) == 0
    index.record("w0", keys)
    index.forget("w0")
    assert index.matched("w0", keys) == 0
    with pytest.raises(ValueError, match="capacity"):
        PrefixIndex(0)


@pytest.mark.parametrize(("weight", "same_worker"), [(1.0, True), (0.0, False)])
def test_router_sends_a_shared_prefix_back_to_the_same_worker(weight: float, same_worker: bool) -> None:
    prefix = list(range(1, 4 * BLOCK_TOKENS + 1))

    async def scenario() -> None:
        workers = [FakeWorker("c0", "colocated"), FakeWorker("c1", "colocated")]
        async with cluster(workers, prefix_affinity_weight=weight) as (_, stub):
            for i in range(6):  # one at a time: both workers are idle each time
                await stub.GenerateUnary(generate_request(prefix + [1000 + i], 2))
        counts = sorted(len(w.submitted) for w in workers)
        assert counts == ([0, 6] if same_worker else [3, 3])
    run(scenario)

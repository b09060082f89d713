"""The engine's role entry points, wired by hand in one process: a prefill_only engine computes the
prompt and keeps its blocks, its KV is copied block by block into a remote_prefill engine's landing
zone, and the decode engine continues. Outputs equal a single engine's, token for token."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.common.config import EngineConfig
from pdserve.engine.engine import LLMEngine

PROMPTS = ["Hello there, how are", "The quick brown fox jumps over the lazy dog", "a"]


def _engine(**kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny-random", max_model_len=128, num_kv_blocks=64, block_size=4, **kw))


def _run_until_finished(engine: LLMEngine, request_ids: set[str]) -> dict:
    deltas: dict[str, list] = {rid: [] for rid in request_ids}
    while any(not d or not d[-1].finished for d in deltas.values()):
        for delta in engine.step():
            deltas[delta.request_id].append(delta)
    return deltas


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=7, ignore_eos=True),
])
def test_prefill_then_remote_decode_equals_one_engine(params: SamplingParams) -> None:
    expected = [o.token_ids for o in LLM(model="tiny-random", max_model_len=128, num_kv_blocks=64,
                                         block_size=4).generate(PROMPTS, params)]
    prefill, decode = _engine(), _engine()
    got = []
    for i, prompt in enumerate(PROMPTS):
        rid = f"r{i}"
        decode.add_request(rid, prompt=prompt, params=params, remote_prefill=True)
        assert decode.step() == []  # admission only: the landing zone, no compute
        [zone] = decode.take_landing_zones()
        assert zone.request_id == rid and zone.num_skip_blocks == 0
        prefill.add_request(rid, prompt=prompt, params=params, prefill_only=True)
        [first] = _run_until_finished(prefill, {rid})[rid]
        assert first.finished and len(first.new_token_ids) == 1
        src = prefill.kv.block_ids(rid)
        for src_cache, dst_cache in zip(prefill.kv_caches, decode.kv_caches):
            dst_cache[:, zone.block_ids] = src_cache[:, src[: len(zone.block_ids)]]
        assert prefill.release_held_blocks(rid) and not prefill.release_held_blocks(rid)
        forward_tokens = decode.runner.num_forward_tokens
        head = decode.complete_remote_prefill(rid, first.new_token_ids[0])
        assert head is not None and head.new_token_ids == first.new_token_ids
        rest = _run_until_finished(decode, {rid})[rid]
        got.append(head.new_token_ids + [t for d in rest for t in d.new_token_ids])
        # the decode engine ran exactly one token per generated token after the first: no prefill
        assert decode.runner.num_forward_tokens - forward_tokens == len(got[-1]) - 1
    assert got == expected
    prefill.check_invariants()
    decode.check_invariants()


def test_landing_zone_reuses_the_decode_prefix_cache_and_failure_frees() -> None:
    decode = _engine()
    params = SamplingParams(max_tokens=4, temperature=0.0)
    # warm the decode engine's prefix cache with a local run of the same prompt
    decode.add_request("warm", prompt=PROMPTS[1], params=params)
    _run_until_finished(decode, {"warm"})
    decode.add_request("remote", prompt=PROMPTS[1], params=params, remote_prefill=True)
    decode.step()
    [zone] = decode.take_landing_zones()
    assert zone.num_skip_blocks > 0
    free_before = decode.kv.num_free_blocks
    delta = decode.fail_request("remote", "KV never arrived")
    assert delta is not None and delta.finished and delta.finish_reason == "error" and delta.error
    assert decode.kv.num_free_blocks > free_before
    decode.check_invariants()


def test_abort_frees_held_and_waiting_for_kv_blocks() -> None:
    prefill, decode = _engine(), _engine()
    params = SamplingParams(max_tokens=4)
    prefill.add_request("x", prompt="hello", params=params, prefill_only=True)
    _run_until_finished(prefill, {"x"})
    assert prefill.num_held_requests == 1
    prefill.abort_request("x")
    assert prefill.num_held_requests == 0
    decode.add_request("y", prompt="hello", params=params, remote_prefill=True)
    decode.step()
    assert decode.abort_request("y") is not None
    prefill.check_invariants()
    decode.check_invariants()

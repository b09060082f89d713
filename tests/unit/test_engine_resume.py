"""Resumed requests (a stream moved from a lost worker): the tokens already generated follow the prompt,
count as output and are not sent again; the rest equals an uninterrupted run, token for token."""

from __future__ import annotations

import pytest

from pdserve import SamplingParams
from pdserve.common.config import EngineConfig
from pdserve.common.errors import InvalidParameterError
from pdserve.engine.engine import LLMEngine

PROMPT = "The quick brown fox jumps over"


def _engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny-random", max_model_len=128, num_kv_blocks=64, block_size=4))


def _run(engine: LLMEngine, rid: str) -> list:
    deltas: list = []
    for _ in range(1000):
        if deltas and deltas[-1].finished:
            break
        deltas += [d for d in engine.step() if d.request_id == rid]
    return deltas


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=2, min_tokens=10),
    SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, repetition_penalty=1.3,
                   frequency_penalty=0.5, presence_penalty=0.4),
    SamplingParams(max_tokens=14, temperature=0.9, top_k=40, top_p=0.95, seed=11, ignore_eos=True),
])
@pytest.mark.parametrize("cut", [1, 6, 13])
def test_a_resumed_stream_continues_exactly(params: SamplingParams, cut: int) -> None:
    engine = _engine()
    engine.add_request("whole", prompt=PROMPT, params=params)
    full = _run(engine, "whole")
    tokens = [t for d in full for t in d.new_token_ids]
    text = "".join(d.new_text for d in full)
    assert len(tokens) == 14
    engine.check_invariants()

    moved = _engine()
    moved.add_request("moved", prompt=PROMPT, params=params, resume_token_ids=tokens[:cut])
    rest = _run(moved, "moved")
    assert [t for d in rest for t in d.new_token_ids] == tokens[cut:]
    sent_text = "".join(d.new_text for d in full[:cut])
    assert sent_text + "".join(d.new_text for d in rest) == text
    assert rest[-1].finish_reason == full[-1].finish_reason
    assert rest[-1].num_prompt_tokens == full[-1].num_prompt_tokens  # the resumed tokens are output
    if params.logprobs is not None:
        assert all(d.new_logprobs and len(d.new_logprobs) == len(d.new_token_ids) for d in rest)
    moved.check_invariants()


def test_resume_is_checked() -> None:
    engine = _engine()
    params = SamplingParams(max_tokens=4, temperature=0.0)
    with pytest.raises(InvalidParameterError) as err:
        engine.add_request("a", prompt=PROMPT, params=params, resume_token_ids=[1, 2, 3, 4])
    assert err.value.field == "resume_token_ids" and "max_tokens" in err.value.message
    with pytest.raises(InvalidParameterError) as err:
        engine.add_request("b", prompt=PROMPT, params=params, resume_token_ids=[10 ** 9])
    assert err.value.field == "resume_token_ids"
    with pytest.raises(InvalidParameterError) as err:
        engine.add_request("c", prompt=PROMPT, params=params, resume_token_ids=[1], remote_prefill=True)
    assert err.value.field == "resume_token_ids"
    assert not engine.has_unfinished_requests()

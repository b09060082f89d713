"""The public offline API on the built-in tiny model: outputs, stop conditions, seeds, logprobs, errors."""

from __future__ import annotations

import pytest

from pdserve import LLM, SamplingParams
from pdserve.common.errors import InvalidParameterError, PromptTooLongError
from pdserve.engine.byte_tokenizer import EOS_ID


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="tiny-random", max_model_len=512, num_kv_blocks=256)


PROMPTS = ["Hello", "The quick brown fox", "pdserve serves LLMs with disaggregated prefill and decode.", "a"]


def greedy(n: int = 32, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def test_tiny_random_demo_prints_text(llm: LLM) -> None:
    out = llm.generate("Hello", greedy(24, ignore_eos=True))[0]
    assert out.finished and out.finish_reason == "length"
    assert len(out.token_ids) == 24 and out.text
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert out.prompt == "Hello" and out.prompt_token_ids[0] == llm.tokenizer.bos_token_id


def test_outputs_keep_prompt_order_and_match_single_runs(llm: LLM) -> None:
    batch = llm.generate(PROMPTS, greedy(ignore_eos=True))
    singles = [llm.generate(p, greedy(ignore_eos=True))[0] for p in PROMPTS]
    assert [o.token_ids for o in batch] == [o.token_ids for o in singles]
    assert [o.prompt for o in batch] == PROMPTS


def test_token_id_prompts_equal_text_prompts(llm: LLM) -> None:
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    by_text = llm.generate(PROMPTS, greedy())
    by_ids = llm.generate(prompt_token_ids=ids, sampling_params=greedy())
    assert [o.token_ids for o in by_text] == [o.token_ids for o in by_ids]


def test_max_tokens_and_eos(llm: LLM) -> None:
    free = llm.generate(PROMPTS, greedy(200))
    stopped = [o for o in free if o.finish_reason == "stop"]
    assert stopped, "the tiny model emits EOS for some prompt within 200 tokens"
    for o in stopped:
        assert o.token_ids[-1] == EOS_ID and EOS_ID not in o.token_ids[:-1]
        assert o.stop_reason is None
    ignored = llm.generate([o.prompt for o in stopped], greedy(200, ignore_eos=True))
    for before, after in zip(stopped, ignored):
        assert len(after.token_ids) == 200 and after.finish_reason == "length"
        assert after.token_ids[: len(before.token_ids)] == before.token_ids


def test_min_tokens_blocks_eos(llm: LLM) -> None:
    base = [o for o in llm.generate(PROMPTS, greedy(200)) if o.finish_reason == "stop"][0]
    n = len(base.token_ids)
    out = llm.generate(base.prompt, greedy(n + 20, min_tokens=n + 5))[0]
    assert EOS_ID not in out.token_ids[: n + 5]
    assert len(out.token_ids) >= n + 5


def test_stop_token_ids(llm: LLM) -> None:
    base = llm.generate("The quick brown fox", greedy(40, ignore_eos=True))[0]
    stop_id = base.token_ids[10]
    first = base.token_ids.index(stop_id)
    out = llm.generate("The quick brown fox", greedy(40, ignore_eos=True, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(llm: LLM, include: bool) -> None:
    base = llm.generate("Hello", greedy(60, ignore_eos=True))[0].text
    stop = base[20:23]
    cut = base.index(stop)
    out = llm.generate("Hello", greedy(60, ignore_eos=True, stop=[stop, "\x00never"],
                                       include_stop_str_in_output=include))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (base[: cut + len(stop)] if include else base[:cut])
    assert len(out.token_ids) < 60


def test_context_full_finishes_with_length() -> None:
    llm = LLM(model="tiny-random", max_model_len=20, num_kv_blocks=16)
    out = llm.generate("Hello", greedy(100, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == 20


def test_seeded_sampling_is_independent_of_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate("Hello", seeded)[0].token_ids
    noisy = SamplingParams(max_tokens=30, temperature=1.3, ignore_eos=True)
    other_seed = SamplingParams(max_tokens=10, temperature=0.8, seed=99, ignore_eos=True)
    mixed = llm.generate(["The quick brown fox", "a", "Hello", "Hello"], [noisy, other_seed, seeded, noisy])
    assert mixed[2].token_ids == alone
    again = llm.generate(["Hello", "x"], [seeded, noisy])[0].token_ids
    assert again == alone
    different = llm.generate("Hello", SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=4321,
                                                     ignore_eos=True))[0].token_ids
    assert different != alone


def test_unseeded_sampling_varies(llm: LLM) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    outs = llm.generate(["Hello"] * 4, params)
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_logprobs(llm: LLM) -> None:
    out = llm.generate("Hello", greedy(8, logprobs=3, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 8
    for token, position in zip(out.token_ids, out.logprobs):
        assert token in position and position[token].rank == 1  # greedy picks the top token
        assert 3 <= len(position) <= 4
        assert all(lp.logprob <= 0.0 for lp in position.values())
        assert position[token].decoded_token == llm.tokenizer.token_text(token)
    assert llm.generate("Hello", greedy(4))[0].logprobs is None


def test_chat_uses_the_template(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(messages, greedy(8))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode_chat(messages)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": -1}, "seed"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_prompt_too_long_is_rejected_before_any_compute() -> None:
    llm = LLM(model="tiny-random", max_model_len=32, num_kv_blocks=16)
    before = llm.engine.runner.num_forward_tokens
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        llm.generate(["short", "x" * 100], greedy(4))
    assert llm.engine.runner.num_forward_tokens == before
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("ids", [[], [1, 2, 100000], [1, -3]])
def test_bad_token_id_prompts(llm: LLM, ids: list[int]) -> None:
    with pytest.raises(InvalidParameterError):
        llm.generate(prompt_token_ids=[ids], sampling_params=greedy(4))


def test_wrong_number_of_sampling_params(llm: LLM) -> None:
    with pytest.raises(InvalidParameterError, match="sampling_params"):
        llm.generate(["a", "b"], [greedy(), greedy(), greedy()])


def test_abort_frees_blocks(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("abort-me", prompt="Hello there", params=greedy(50, ignore_eos=True))
    engine.step()
    assert engine.kv.has_blocks("abort-me")
    delta = engine.abort_request("abort-me")
    assert delta is not None and delta.finished and delta.finish_reason == "abort"
    # its prompt's step is still in flight (asynchronous scheduling) and writes into its blocks: they
    # are freed once that step landed, never while it may still write (another request, or a landing
    # zone filled by another GPU, could hold them by then)
    assert engine.kv.has_blocks("abort-me") and engine.has_unfinished_requests()
    engine.check_invariants()
    engine.step()
    assert not engine.kv.has_blocks("abort-me") and not engine.has_unfinished_requests()
    engine.check_invariants()
    assert engine.abort_request("abort-me") is None


def test_unknown_model_directory_errors(tmp_path) -> None:
    from pdserve.common.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(model=str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*not supported"):
        LLM(model=str(tmp_path))

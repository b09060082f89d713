"""The eager-path warm-up: its steps stay inside the engine's limits and cover every kind of eager step,
and running them on a real engine leaves the KV cache whole and the outputs unchanged."""

from __future__ import annotations

import pytest

from pdserve.engine.eager_warmup import MANY_PROMPTS, eager_warmup_steps


@pytest.mark.parametrize(("max_tokens", "max_decodes", "max_context"),
                         [(8192, 256, 16384), (8192, 256, 4096), (2048, 8, 2304), (512, 256, 512), (16, 4, 64)])
def test_steps_fit_the_budget_and_cover_every_kind(max_tokens: int, max_decodes: int, max_context: int) -> None:
    steps = eager_warmup_steps(max_tokens, max_decodes, max_context)
    for decode_contexts, chunks in steps:
        assert chunks and all(tokens >= 1 for tokens, _ in chunks)
        assert len(decode_contexts) + sum(tokens for tokens, _ in chunks) <= max_tokens
        assert len(decode_contexts) + len(chunks) <= max_decodes
        assert all(context + 1 <= max_context for context in decode_contexts)
        assert all(context + tokens <= max_context for tokens, context in chunks)
    fresh_counts = {len(chunks) for decodes, chunks in steps if not decodes and all(c == 0 for _, c in chunks)}
    assert {1, 2} <= fresh_counts
    if max_decodes >= MANY_PROMPTS and max_tokens >= 2 * MANY_PROMPTS:
        assert MANY_PROMPTS in fresh_counts
    assert any(context > 0 for _, chunks in steps for _, context in chunks)  # a later chunk of a prompt
    if max_decodes >= 2 and min(max_tokens, max_context) >= 64:
        assert any(decodes and chunks for decodes, chunks in steps)
    sizes = {len(d) + sum(t for t, _ in c) for d, c in steps}
    if max_tokens >= 64:
        assert any(s % 16 == 0 for s in sizes) and any(s % 16 for s in sizes)  # both Triton specialisations


def test_warm_up_on_an_engine_gives_every_block_back_and_changes_no_output() -> None:
    """Through a real engine (tiny model, CPU): after the warm-up the KV cache is whole, no request is
    known to the scheduler, and a generation equals the one before it, with prefix caching on (the
    synthetic steps' garbage KV must never be found as a cached prefix)."""
    from pdserve import EngineConfig, SamplingParams
    from pdserve.engine.eager_warmup import warm_eager_path
    from pdserve.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny-random", max_num_batched_tokens=512, max_model_len=1024,
                                    enable_prefix_caching=True, seed=0))
    prompt = [2] * 300 + [5, 6, 7]  # the warm-up's prompts are runs of token 2

    def generate() -> list[int]:
        engine.add_request("r", prompt_token_ids=list(prompt),
                           params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            tokens += [t for delta in engine.step() for t in delta.new_token_ids]
        return tokens

    before = generate()
    assert warm_eager_path(engine) >= 0.0
    assert engine.kv.num_free_blocks == engine.kv.pool.num_usable_blocks
    assert engine.kv.num_requests == 0
    assert generate() == before


def test_the_profile_grid_runs_only_where_a_model_is_needed_and_no_file_gives_it(tmp_path) -> None:  # noqa: ANN001
    """``measures_step_time`` decides both whether start-up times the grid and whether the eager warm-up
    runs instead (on CUDA)."""
    from pdserve import EngineConfig

    profile = tmp_path / "profile.json"
    profile.write_text("{}")
    assert not EngineConfig(model="tiny-random").measures_step_time
    assert EngineConfig(model="tiny-random", step_time_budget_ms=15.0).measures_step_time
    assert EngineConfig(model="tiny-random", ttft_slo_ms=250.0).measures_step_time
    assert not EngineConfig(model="tiny-random", step_time_budget_ms=15.0,
                            step_time_profile=str(profile)).measures_step_time

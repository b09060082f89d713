"""The GPU engine (Triton kernels, CUDA graphs for every step shape, asynchronous scheduling) against the
CPU reference engine, token for token."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve import LLM, SamplingParams
from tests.support.hf_models import make_hf_model
from tests.support.two_waves import two_waves

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("kind", "async_scheduling", "graph_tokens", "balanced"), [
    ("llama31", True, 2048, False), ("llama31", False, 2048, False), ("qwen3", True, 2048, False),
    ("mistral", True, 16, False), ("llama31", True, 2048, True),
])
def test_gpu_engine_float32_equals_cpu_reference(kind: str, async_scheduling: bool, graph_tokens: int,
                                                 balanced: bool, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill-only, mixed (chunked prefill + decodes) and decode steps, then prefix hits; every step a
    graph replay (or, with 16-token graphs, the larger ones eager); decodes split alike, or each by its
    own context (``balanced``)."""
    from pdserve.engine import kv_splits

    monkeypatch.setattr(kv_splits, "BALANCED_DECODE_SPLITS", balanced)
    if kind == "llama31":
        make_hf_model(kind, tmp_path)
    else:
        make_hf_model(kind, tmp_path, head_dim=64)
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 7, 33, 64, 100, 5, 250, 17)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    kwargs = dict(model=str(tmp_path), dtype="float32", max_model_len=512, block_size=16, max_num_seqs=16,
                  max_num_batched_tokens=64)  # a small budget: chunked prefill mixed with decodes
    cpu = LLM(device="cpu", attention_backend="torch", num_kv_blocks=512, **kwargs)
    gpu = LLM(device="cuda", num_kv_blocks=512, async_scheduling=async_scheduling,
              cuda_graph_max_tokens=graph_tokens, **kwargs)
    assert gpu.engine.runner.graphs is not None
    for _ in range(2):  # the second round hits the prefix cache
        expected = [o.token_ids for o in cpu.generate(prompt_token_ids=prompts, sampling_params=params)]
        got = [o.token_ids for o in gpu.generate(prompt_token_ids=prompts, sampling_params=params)]
        assert got == expected
    runner = gpu.engine.runner
    assert runner.num_graph_steps > 0
    assert (runner.num_eager_steps > 0) == (graph_tokens < 64)
    assert (runner.inputs.num_fed_rows > 0) == async_scheduling
    del gpu
    torch.cuda.empty_cache()


def test_steps_that_replay_a_larger_graph_give_the_same_tokens(tmp_path) -> None:
    """A step replays the fastest captured graph that holds it (timed at start-up), which may be a larger
    one than the smallest fit: with every step routed to the largest graph the tokens stay the CPU
    reference's."""
    make_hf_model("llama31", tmp_path)
    rng = random.Random(7)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (3, 40, 90, 12, 61)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    kwargs = dict(model=str(tmp_path), dtype="float32", max_model_len=512, max_num_seqs=8, num_kv_blocks=256,
                  max_num_batched_tokens=64)
    expected = [o.token_ids for o in LLM(device="cpu", attention_backend="torch", **kwargs).generate(
        prompt_token_ids=prompts, sampling_params=params)]
    gpu = LLM(device="cuda", **kwargs)
    graphs = gpu.engine.runner.graphs
    assert graphs is not None and set(graphs.replay_ms) == {s.num_tokens for s in graphs.shapes}
    graphs._choice = [len(graphs.shapes) - 1] * len(graphs.shapes)
    assert graphs.shape_for(1) is graphs.shapes[-1]
    got = [o.token_ids for o in gpu.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert got == expected and gpu.engine.runner.num_graph_steps > 0


def test_bf16_graphs_match_eager(tmp_path) -> None:
    make_hf_model("llama", tmp_path)
    prompts = [[i % 250 + 1 for i in range(n)] for n in (3, 40, 90)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    common = dict(model=str(tmp_path), dtype="bfloat16", max_model_len=256, max_num_seqs=8, num_kv_blocks=256)
    graphs = LLM(**common).generate(prompt_token_ids=prompts, sampling_params=params)
    eager = LLM(enforce_eager=True, **common).generate(prompt_token_ids=prompts, sampling_params=params)
    same = sum(a.token_ids == b.token_ids for a, b in zip(graphs, eager))
    assert same >= 2  # identical kernels; a split-count difference may flip a near-tie in bf16


def test_layer_hook_sees_every_layer_after_a_graph_replay(tmp_path) -> None:
    """The prefill role streams KV from the per-layer hook: a replayed step calls it for every layer,
    in order, and the KV it points at (read after the queued work ran) is the eager step's."""
    make_hf_model("llama", tmp_path)
    prompt = [i % 250 + 1 for i in range(40)]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    common = dict(model=str(tmp_path), dtype="float32", max_model_len=256, num_kv_blocks=64,
                  enable_prefix_caching=False)
    seen: dict[bool, list[tuple[int, torch.Tensor]]] = {}
    for eager in (False, True):
        llm = LLM(enforce_eager=eager, **common)
        engine = llm.engine
        calls: list[tuple[int, torch.Tensor]] = []

        def hook(index: int, kv_cache: torch.Tensor, engine=engine, calls=calls) -> None:  # noqa: ANN001
            torch.cuda.synchronize()
            blocks = torch.tensor(engine.kv.block_ids("r"), device=kv_cache.device)
            calls.append((index, kv_cache[:, blocks].clone()))

        class Hooks:
            def before_forward(self, plan):  # noqa: ANN001, ANN202
                return hook

            def after_forward(self, plan) -> None:  # noqa: ANN001
                pass

        engine.step_hooks = Hooks()
        engine.add_request("r", prompt_token_ids=prompt, params=params, prefill_only=True)
        while engine.has_unfinished_requests():
            engine.step()
        engine.release_held_blocks("r")
        assert [i for i, _ in calls] == list(range(engine.spec.num_layers))
        assert (engine.runner.num_graph_steps > 0) != eager and (engine.runner.num_eager_steps > 0) == eager
        seen[eager] = calls
    for (_, graph_kv), (_, eager_kv) in zip(seen[False], seen[True]):
        assert torch.allclose(graph_kv, eager_kv, atol=1e-5, rtol=1e-5)


def test_budget_cut_chunks_that_fill_their_graph_give_the_reference_tokens(tmp_path) -> None:
    """With a step-time budget, prompt chunks beside decodes are cut, and a cut chunk grows into the
    padding rows of the CUDA graph its step replays (and with ``pad_with_next_prompt`` a prompt left out
    takes what padding is left): the tokens stay the CPU reference's, and without the fill (``graph_rows``
    unset) too."""
    import json

    from pdserve.engine.step_time import StepTimeModel

    make_hf_model("llama31", tmp_path)
    profile = tmp_path / "profile.json"  # 5 ms a step, 0.1 ms a token past 16: a 7 ms budget cuts chunks
    profile.write_text(json.dumps(StepTimeModel(base_s=5e-3, per_token_s=1e-4, free_tokens=16).to_dict()))
    rng = random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 9, 300, 250, 7, 180)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    kwargs = dict(model=str(tmp_path), dtype="float32", max_model_len=512, max_num_seqs=8, num_kv_blocks=256,
                  max_num_batched_tokens=256)
    expected = [o.token_ids for o in LLM(device="cpu", attention_backend="torch", **kwargs).generate(
        prompt_token_ids=prompts, sampling_params=params)]
    for fill, pad in ((True, False), (True, True), (False, False)):
        gpu = LLM(device="cuda", step_time_profile=str(profile), step_time_budget_ms=7.0, **kwargs)
        scheduler = gpu.engine.scheduler
        assert scheduler.graph_rows is not None
        scheduler.pad_with_next_prompt = pad
        if not fill:
            scheduler.graph_rows = None
        engine = gpu.engine
        assert two_waves(gpu, prompts, params) == expected  # two decode first, then the long prompts join them
        assert engine.runner.num_graph_steps > 0
        assert (scheduler.num_filled_chunks > 0) == fill
        del gpu, engine
        torch.cuda.empty_cache()

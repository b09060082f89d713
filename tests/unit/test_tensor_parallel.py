"""Tensor parallelism inside one engine (ranks on threads, all-reduce over gloo): a model split over two
ranks generates what the unsplit model does, token for token, for Llama and Qwen shapes -- KV heads
split, and replicated when there are fewer of them than ranks."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.common.config import EngineConfig
from pdserve.common.errors import ConfigError
from pdserve.engine.model.parallel import TensorParallel
from tests.support.hf_models import make_hf_model

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("kind", ["llama31", "qwen3", "qwen2"])  # qwen2 here: one KV head for two ranks
def test_two_ranks_generate_what_one_does(kind: str, tmp_path) -> None:  # noqa: ANN001
    make_hf_model(kind, tmp_path)
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 23, 40, 1)]
    outputs = {}
    for tp in (1, 2):
        llm = LLM(model=str(tmp_path), device="cpu", max_model_len=128, num_kv_blocks=64, tensor_parallel_size=tp,
                  max_num_batched_tokens=32)  # chunked prefill and mixed steps too
        outputs[tp] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
        if tp == 2:
            ranks = llm.engine.model.ranks
            assert len(ranks) == 2 and ranks[0].spec.num_heads * 2 == ranks[0].full_spec.num_heads
            assert llm.engine.kv_layout.num_kv_heads == max(1, ranks[0].full_spec.num_kv_heads // 2)
    assert outputs[2] == outputs[1]


def test_vocabulary_split_unevenly_over_ranks(tmp_path) -> None:  # noqa: ANN001
    """A vocabulary of 321 over two ranks: rank 0 holds ids 0-160 of the embedding and the LM head,
    rank 1 ids 161-320; lookups and logits of ids on either side equal the unsplit model's."""
    make_hf_model("llama31", tmp_path, vocab_size=321)
    prompts = [[3, 160, 161, 320, 200, 7], [319, 161, 160, 0]]
    outputs = {}
    for tp in (1, 2):
        llm = LLM(model=str(tmp_path), device="cpu", max_model_len=64, num_kv_blocks=32, tensor_parallel_size=tp)
        outputs[tp] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY)]
        if tp == 2:
            ranks = llm.engine.model.ranks
            assert [r.model.embed_tokens.weight.shape[0] for r in ranks] == [161, 160]
            assert [r.lm_head.weight.shape[0] for r in ranks] == [161, 160]
            logits = llm.engine.model.compute_logits(torch.randn(3, ranks[0].spec.hidden_size))
            assert logits.shape == (3, 321)
    assert outputs[2] == outputs[1]


def test_each_rank_reads_only_its_slice_of_the_checkpoint(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """A rank's tensors come from the safetensors file as slices (``get_slice``), never read whole when it
    holds a part: its heads' rows of Q/K/V, its MLP rows and columns, its vocabulary rows -- each equal to
    that part of the full tensor; norms are read whole."""
    from pdserve.engine.model import loader
    from pdserve.engine.model.hf_config import read_config_json

    make_hf_model("qwen2", tmp_path, max_shard_size="20KB")  # one KV head: both ranks hold it; several files
    files = loader.safetensors_files(tmp_path)
    assert len(files) > 1
    spec = loader.inspect_model_dir(tmp_path).spec
    assert read_config_json(tmp_path)["num_key_value_heads"] == 1
    full = dict(loader.iter_checkpoint(files))
    whole_reads: list[str] = []
    real_safe_open = loader.safe_open

    class Spy:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._file = real_safe_open(*args, **kwargs)  # type: ignore[arg-type]

        def __enter__(self) -> Spy:
            self._f = self._file.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self._file.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self._f.keys())

        def get_slice(self, name: str):  # noqa: ANN201
            return self._f.get_slice(name)

        def get_tensor(self, name: str) -> torch.Tensor:
            whole_reads.append(name)
            return self._f.get_tensor(name)

    monkeypatch.setattr(loader, "safe_open", Spy)
    for rank in (0, 1):
        tp = TensorParallel(rank, 2)
        whole_reads.clear()
        parts = dict(loader.iter_checkpoint(files, lambda name, shape: tp.shard_index(name, shape, spec)))  # noqa: B023
        assert parts.keys() == full.keys()
        for name, part in parts.items():
            whole = full[name]
            if any(k in name for k in ("q_proj", "gate_proj", "up_proj")):
                assert torch.equal(part, whole.chunk(2, 0)[rank]) and name not in whole_reads
            elif any(name.endswith(k) for k in ("o_proj.weight", "down_proj.weight")):
                assert torch.equal(part, whole.chunk(2, 1)[rank]) and name not in whole_reads
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                rows = tp.vocab_rows(spec.vocab_size)
                assert torch.equal(part, whole[rows.start:rows.stop]) and name not in whole_reads
            elif any(k in name for k in ("k_proj", "v_proj")):  # the one KV head, held by both ranks
                assert torch.equal(part, whole) and name not in whole_reads
            else:
                assert torch.equal(part, whole) and name in whole_reads  # norms: the rank holds them whole


def test_splits_that_do_not_divide_are_refused(tmp_path) -> None:  # noqa: ANN001
    make_hf_model("llama31", tmp_path)  # 4 heads, 2 KV heads, MLP 160
    with pytest.raises(ConfigError, match="3 ranks cannot split 4 attention heads"):
        LLM(model=str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=3)
    assert EngineConfig(model=str(tmp_path), device="cuda", tensor_parallel_size=2).tensor_parallel_size == 2
    spec = LLM(model=str(tmp_path), device="cpu", num_kv_blocks=16).engine.spec
    assert [list(TensorParallel(r, 4).kv_heads(spec)) for r in range(4)] == [[0], [0], [1], [1]]


def test_ranks_take_consecutive_gpus_and_too_few_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r computes on the r-th GPU from the engine's device; a process that sees too few GPUs is
    told how many the ranks need (the GPU count is faked: this machine has none)."""
    from pdserve.engine.device import rank_devices

    assert rank_devices(torch.device("cpu"), 3) == [torch.device("cpu")] * 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rank_devices(torch.device("cuda", 1), 2) == [torch.device("cuda", 1), torch.device("cuda", 2)]
    with pytest.raises(ConfigError, match=r"2 ranks from cuda:3 need GPUs 3..4; this process sees 4"):
        rank_devices(torch.device("cuda", 3), 2)


def test_transfer_caches_split_kv_heads_into_groups(tmp_path) -> None:  # noqa: ANN001
    """What KV transfer between degrees moves: per layer ``head_groups`` views of consecutive KV heads,
    rank by rank, each a view into the rank's own cache; groups that do not fit are refused."""
    make_hf_model("llama31", tmp_path)  # 2 KV heads
    one = LLM(model=str(tmp_path), device="cpu", num_kv_blocks=16).engine
    two = LLM(model=str(tmp_path), device="cpu", num_kv_blocks=16, tensor_parallel_size=2).engine
    views = one.transfer_caches(2)
    assert len(views) == 2 * one.spec.num_layers and all(v.shape[3] == 1 for v in views)
    views[3].fill_(7.0)  # layer 1, second head: written through into the cache
    assert (one.kv_caches[1][:, :, :, 1] == 7.0).all() and (one.kv_caches[1][:, :, :, 0] == 0.0).all()
    ranks = two.transfer_caches(2)
    assert [v.data_ptr() for v in ranks[:2]] == [two.model.kv_caches[0][0].data_ptr(),
                                                 two.model.kv_caches[1][0].data_ptr()]
    assert len(two.transfer_caches()) == 2 * two.spec.num_layers
    with pytest.raises(ConfigError, match="3 groups of KV heads do not fit 2 tensor-parallel rank"):
        two.transfer_caches(3)
    with pytest.raises(ConfigError, match="4 groups of KV heads"):
        one.transfer_caches(4)


def test_graph_steps_cover_prefill_steps_only_with_several_ranks() -> None:
    """One rank keeps graphs to 1k-token steps; several ranks (whose threads launch eagerly under one
    interpreter) replay every step up to the step budget, at most 8k; an explicit setting wins."""
    assert EngineConfig().graph_max_tokens == 1024
    assert EngineConfig(tensor_parallel_size=2, max_num_batched_tokens=2048).graph_max_tokens == 2048
    assert EngineConfig(tensor_parallel_size=2, max_num_batched_tokens=16384).graph_max_tokens == 8192
    assert EngineConfig(tensor_parallel_size=2, cuda_graph_max_tokens=512).graph_max_tokens == 512
    with pytest.raises(ConfigError, match="cuda_graph_max_tokens"):
        EngineConfig(cuda_graph_max_tokens=-1)


def test_row_parallel_projections_without_a_bias_defer_their_all_reduce_to_the_norm() -> None:
    """(So that on GPUs one kernel sums and normalises; the CPU tests above run the deferred path.)"""
    from pdserve.engine.model.parallel import RowParallelLinear, TensorParallel

    assert RowParallelLinear(8, 4, False, TensorParallel(0, 2)).defers_reduce
    assert not RowParallelLinear(8, 4, True, TensorParallel(0, 2)).defers_reduce  # the bias comes after the sum
    assert not RowParallelLinear(8, 4, False, TensorParallel()).defers_reduce  # one rank: nothing to sum


def test_peer_all_reduce_size_is_validated() -> None:
    assert EngineConfig().peer_all_reduce_max_bytes == 0  # NCCL for every size until measured on two GPUs
    assert EngineConfig(peer_all_reduce_max_bytes=1 << 20).peer_all_reduce_max_bytes == 1 << 20
    for bad in (-1, 1 << 30, 1.5):
        with pytest.raises(ConfigError, match="peer_all_reduce_max_bytes"):
            EngineConfig(peer_all_reduce_max_bytes=bad)  # type: ignore[arg-type]
    assert EngineConfig().peer_all_reduce_fuse_norm is True
    with pytest.raises(ConfigError, match="peer_all_reduce_fuse_norm"):
        EngineConfig(peer_all_reduce_fuse_norm="yes")  # type: ignore[arg-type]

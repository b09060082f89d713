"""Sizing an engine's KV cache: what the GPU can hold after the weights and the largest step's activations.

Called once by :class:`~pdserve.engine.engine.LLMEngine` while it starts, after the weights are loaded
and before the cache is allocated.
"""

from __future__ import annotations

import logging

import torch

from pdserve.common.errors import ConfigError
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.kv_cache.manager import KVCacheManager
from pdserve.engine.kv_cache.tensors import KVCacheLayout, allocate_kv_caches, num_blocks_for_budget
from pdserve.engine.request import Request
from pdserve.engine.sampler import SamplingRow
from pdserve.engine.step_plan import ScheduledChunk
from pdserve.engine.tensor_parallel import TensorParallelModel

logger = logging.getLogger(__name__)


def size_kv_cache(engine) -> int:  # noqa: ANN001 (LLMEngine: avoids an import cycle)
    """How many KV blocks the engine gets (lowering ``engine.max_model_len`` to fit when it was not set)."""
    config, spec, bs = engine.config, engine.spec, engine.config.block_size
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        if engine.device.type == "cuda":
            reserve = profile_activation_bytes(engine)
            free, total = torch.cuda.mem_get_info(engine.device)
            budget = int(total * config.gpu_memory_utilization) - (total - free) - reserve
        else:
            budget = int(config.cpu_kv_cache_gib * 2**30)
        num_blocks = num_blocks_for_budget(spec, bs, engine.dtype, budget)
        # never more than every sequence at full length needs (+1 for the null block)
        num_blocks = min(num_blocks, -(-config.max_num_seqs * engine.max_model_len // bs) + 1)
    capacity_tokens = (num_blocks - 1) * bs
    if capacity_tokens < engine.max_model_len:
        if config.max_model_len is not None or capacity_tokens < bs:
            raise ConfigError("max_model_len", f"the KV cache holds {capacity_tokens} tokens ({num_blocks - 1} "
                              f"usable blocks of {bs}), less than max_model_len={engine.max_model_len}: raise "
                              f"the KV memory (num_kv_blocks, gpu_memory_utilization, cpu_kv_cache_gib) "
                              f"or lower max_model_len")
        logger.warning("KV cache holds %d tokens; lowering max_model_len from %d", capacity_tokens,
                       engine.max_model_len)
        engine.max_model_len = capacity_tokens
    return num_blocks


def profile_activation_bytes(engine) -> int:  # noqa: ANN001
    """Peak transient memory of the largest step: a dummy prefill of ``max_num_batched_tokens``
    tokens into a temporary cache, plus logits and sampling for ``max_num_seqs`` rows; with a margin
    for CUDA graphs and allocator fragmentation. Measured on rank 0's GPU (a tensor-parallel model's
    ranks hold equal shares, and rank 0 also holds the logits)."""
    config, spec = engine.config, engine.spec
    num_tokens = min(config.max_num_batched_tokens, engine.max_model_len - 1)
    temp_kv = KVCacheManager(-(-num_tokens // config.block_size) + 1, config.block_size, False)
    layout = KVCacheLayout(spec.num_layers, temp_kv.pool.num_blocks, config.block_size, spec.num_kv_heads,
                           spec.head_dim, engine.dtype)
    engine.runner.kv_caches = allocate_kv_caches(layout, engine.device)
    tensor_parallel = engine.model if isinstance(engine.model, TensorParallelModel) else None
    if tensor_parallel is not None:  # every rank runs the dummy step, each into a temporary cache of its own
        tensor_parallel.attach_kv_caches(layout, engine.runner.kv_caches)
    torch.cuda.synchronize(engine.device)
    torch.cuda.reset_peak_memory_stats(engine.device)
    base = torch.cuda.memory_allocated(engine.device)
    dummy = Request("profile", [1] * num_tokens, SamplingParams(max_tokens=1))
    temp_kv.allocate_slots(dummy, num_tokens)
    engine.runner.run_dummy_prefill([ScheduledChunk.of(dummy, num_tokens, temp_kv.block_ids("profile"))])
    logits = engine.model.compute_logits(torch.zeros(config.max_num_seqs, spec.hidden_size, dtype=engine.dtype,
                                                   device=engine.device))
    rows = [SamplingRow(f"p{i}", SamplingParams(top_p=0.9, top_k=50), [], [], ()) for i in range(len(logits))]
    engine.sampler.sample(logits, rows)
    torch.cuda.synchronize(engine.device)
    peak = torch.cuda.max_memory_allocated(engine.device) - base
    del logits
    engine.runner.kv_caches = []
    if tensor_parallel is not None:
        tensor_parallel.detach_kv_caches()
    torch.cuda.empty_cache()
    return peak + 256 * 2**20

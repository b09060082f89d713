"""Run prompts straight through an engine's model (every position's logits), bypassing the scheduler."""

from __future__ import annotations

import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import LLMEngine
from pdserve.engine.request import Request
from pdserve.engine.step_plan import ScheduledChunk


@torch.inference_mode()
def prompt_logits(engine: LLMEngine, prompts: list[list[int]], chunk_sizes: list[int] | None = None
                  ) -> list[torch.Tensor]:
    """Logits ``[len(prompt), vocab]`` of each prompt, all packed into the same forward passes.

    ``chunk_sizes`` splits every prompt into consecutive chunks of these sizes (the last chunk takes the
    rest), one forward pass per chunk, each reading the earlier chunks' KV from the paged cache.
    """
    requests = [Request(f"probe-{i}", list(p), SamplingParams(max_tokens=1)) for i, p in enumerate(prompts)]
    per_prompt: list[list[torch.Tensor]] = [[] for _ in prompts]
    sizes = list(chunk_sizes or [])
    try:
        while any(r.num_computed_tokens < r.num_tokens for r in requests):
            size = sizes.pop(0) if sizes else None
            chunks, owners = [], []
            sizes_now = [(i, r, r.num_tokens_to_compute if size is None else min(size, r.num_tokens_to_compute))
                         for i, r in enumerate(requests)]
            for i, r, n in sorted(sizes_now, key=lambda x: x[2] != 1):  # the runner wants decodes first
                if n == 0:
                    continue
                assert engine.kv.allocate_slots(r, n), "probe ran out of KV blocks"
                chunks.append(ScheduledChunk.of(r, n, engine.kv.block_ids(r.request_id)))
                owners.append(i)
            hidden, metadata = engine.runner.forward(chunks)
            logits = engine.model.compute_logits(hidden)
            starts = metadata.query_start_loc_cpu
            for j, (chunk, i) in enumerate(zip(chunks, owners)):
                per_prompt[i].append(logits[starts[j]:starts[j + 1]])
                chunk.request.num_computed_tokens += chunk.num_tokens
    finally:
        for r in requests:
            engine.kv.free(r)
    return [torch.cat(parts) for parts in per_prompt]

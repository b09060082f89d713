"""Compile the eager path's kernels at start-up, so that no request waits for a compiler.

Steps larger than every CUDA graph run eagerly, and their Triton kernels are compiled the first time a
step of their kind runs: on an H200 the first eager step of a fresh process (16 prompts of 512 tokens,
or one prompt of 8k) took 1.9-2.4 s on the host against ~0.2 s after (measured 2026-12-02, Llama-3.1-8B
shapes), and such a stall stops every stream of the worker at once. CUDA-graph capture compiles what the
graphs replay, and a worker that measures its step-time profile at start-up runs eager steps of every
kind on its grid; the offline engine and a worker that loads its profile from a file (or runs without a
step-time model) ran none.

:func:`warm_eager_path` runs one synthetic step (no sampling, blocks borrowed from the KV cache and
given back, nothing visible to the scheduler) of each kind an eager step can be: one fresh prompt of the
whole token budget (the fused dense attention), two fresh prompts (dense, two chunks), many short fresh
prompts (the Triton prefill kernel), a later chunk of a prompt, and decodes beside a later chunk; token
counts both multiples of 16 and not, since Triton specialises integer arguments on that. Called once,
after the graphs and attention plans, before the engine serves anything.
"""

from __future__ import annotations

import time

import torch

from pdserve.engine.step_profile import synthetic_step_timer

#: Fresh prompts in the many-prompt warm-up step: more than the fused attention takes in one step.
MANY_PROMPTS = 16


def eager_warmup_steps(max_tokens: int, max_decodes: int, max_context: int) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """The warm-up steps, each ``(decode_contexts, [(chunk_tokens, chunk_context), ...])``, within a
    step budget of ``max_tokens`` tokens, ``max_decodes`` sequences and ``max_context`` tokens a sequence."""
    tokens = min(max_tokens, max_context)
    steps: list[tuple[list[int], list[tuple[int, int]]]] = [([], [(tokens, 0)])]
    if tokens >= 4:
        steps.append(([], [(tokens // 2 - 1, 0), (tokens - tokens // 2, 0)]))
    if max_decodes >= MANY_PROMPTS and tokens >= 2 * MANY_PROMPTS:
        each = tokens // MANY_PROMPTS
        steps.append(([], [(each, 0)] * (MANY_PROMPTS - 1) + [(tokens - each * (MANY_PROMPTS - 1) - 3, 0)]))
    context = min(1024, max_context // 2)
    later = min(max_tokens, max_context - context) - 1
    if later >= 1:
        steps.append(([], [(later, context)]))
    decodes = min(max_decodes - 1, 64)
    if decodes >= 1 and later - decodes >= 1:
        steps.append(([context] * decodes, [(later - decodes, context)]))
    return steps


def warm_eager_path(engine) -> float:  # noqa: ANN001 (LLMEngine: avoids an import cycle)
    """Run every warm-up step once on ``engine`` (see the module); returns the seconds it took. A step
    that does not fit the KV cache is skipped."""
    started = time.perf_counter()
    run_step = synthetic_step_timer(engine)
    config = engine.config
    for decode_contexts, chunks in eager_warmup_steps(config.max_num_batched_tokens, config.max_num_seqs,
                                                      engine.max_model_len):
        try:
            run_step(decode_contexts, chunks)
        except RuntimeError:  # does not fit this KV cache: a smaller cache never runs such a step either
            continue
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - started

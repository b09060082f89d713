"""Measure an engine's step-time model at start-up: time synthetic steps through its own runner.

Each synthetic step borrows blocks from the engine's KV cache for dummy requests (``decodes`` requests
each with ``context`` tokens of (garbage) KV, plus ``prompts`` prompt chunks, each after ``chunk_context``
computed tokens of garbage KV), runs the forward pass the
way real steps do (CUDA graph or eager), and gives the blocks back; no request is ever visible to the
scheduler. Called before the engine serves anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.request import Request
from pdserve.engine.step_plan import ScheduledChunk
from pdserve.engine.step_time import StepTimeModel, profile_step_time


def load_or_measure_step_time(engine) -> tuple[StepTimeModel, list[dict]]:  # noqa: ANN001 (LLMEngine: a cycle)
    """The engine's step-time model: from ``step_time_profile`` when set, else measured (leaving the
    runner's step counters as they were: synthetic steps are not work done)."""
    if not engine.config.measures_step_time:
        assert engine.config.step_time_profile is not None, "only an engine that needs a step-time model sets one up"
        return StepTimeModel.load(engine.config.step_time_profile), []
    runner = engine.runner
    counters = (runner.num_forward_tokens, runner.num_prompt_tokens_computed, runner.num_graph_steps,
                runner.num_eager_steps)
    try:
        return measure_step_time(engine)
    finally:
        (runner.num_forward_tokens, runner.num_prompt_tokens_computed, runner.num_graph_steps,
         runner.num_eager_steps) = counters


def synthetic_step_timer(engine) -> Callable[[Sequence[int], Sequence[tuple[int, int]]], float]:  # noqa: ANN001
    """A timer of synthetic steps on ``engine``: ``time_step(decode_contexts, chunks)`` runs one forward
    pass of a decode per entry of ``decode_contexts`` (each reading that many tokens of KV) and a prompt
    chunk per ``(tokens, context)`` of ``chunks``, the way real steps run (graph or eager, without
    sampling), and returns its wall seconds from an idle device to the end of its work. Blocks are
    borrowed from the KV cache and given back; ``RuntimeError`` when the step does not fit it."""
    kv, runner, device = engine.kv, engine.runner, engine.device
    params = SamplingParams(max_tokens=1)

    def borrow(request_id: str, token: int, context: int, tokens: int) -> ScheduledChunk:
        request = Request(request_id, [token] * (context + tokens), params)
        if not kv.allocate_slots(request, context + tokens):
            kv.free(request)
            raise RuntimeError("a synthetic step does not fit the KV cache")
        request.num_computed_tokens = context
        return ScheduledChunk(request, context, tokens, kv.block_ids(request.request_id), False)

    def time_step(decode_contexts: Sequence[int], chunks: Sequence[tuple[int, int]]) -> float:
        scheduled: list[ScheduledChunk] = []
        try:
            for i, context in enumerate(decode_contexts):
                scheduled.append(borrow(f"__profile-d{i}", 1, context, 1))
            for i, (tokens, context) in enumerate(chunks):
                scheduled.append(borrow(f"__profile-p{i}", 2, context, tokens))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            runner.run_dummy_prefill(scheduled)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start
        finally:
            for chunk in scheduled:
                kv.free(chunk.request)

    return time_step


def measure_step_time(engine) -> tuple[StepTimeModel, list[dict]]:  # noqa: ANN001 (LLMEngine: avoids a cycle)
    kv = engine.kv
    time_step = synthetic_step_timer(engine)

    def run(decodes: int, context: int, chunk: int, chunk_context: int, prompts: int) -> float:
        return time_step([context] * decodes, [(chunk, chunk_context)] * (prompts if chunk else 0))

    capacity = (kv.pool.num_usable_blocks - 1) * kv.block_size
    return profile_step_time(run, max_tokens=min(engine.config.max_num_batched_tokens, engine.max_model_len - 1),
                             max_decodes=engine.config.max_num_seqs, max_context=engine.max_model_len - 1,
                             kv_capacity_tokens=capacity)

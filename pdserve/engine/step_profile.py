"""Measure an engine's step-time model at start-up: time synthetic steps through its own runner.

Each synthetic step borrows blocks from the engine's KV cache for dummy requests (``decodes`` requests
each with ``context`` tokens of (garbage) KV, plus ``prompts`` prompt chunks, each after ``chunk_context``
computed tokens of garbage KV), runs the forward pass the
way real steps do (CUDA graph or eager), and gives the blocks back; no request is ever visible to the
scheduler. Called before the engine serves anything.
"""

from __future__ import annotations

import time

import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.request import Request
from pdserve.engine.scheduler import ScheduledChunk
from pdserve.engine.step_time import StepTimeModel, profile_step_time


def load_or_measure_step_time(engine) -> tuple[StepTimeModel, list[dict]]:  # noqa: ANN001 (LLMEngine: a cycle)
    """The engine's step-time model: from ``step_time_profile`` when set, else measured (leaving the
    runner's step counters as they were: synthetic steps are not work done)."""
    if engine.config.step_time_profile is not None:
        return StepTimeModel.load(engine.config.step_time_profile), []
    runner = engine.runner
    counters = (runner.num_forward_tokens, runner.num_prompt_tokens_computed, runner.num_graph_steps,
                runner.num_eager_steps)
    try:
        return measure_step_time(engine)
    finally:
        (runner.num_forward_tokens, runner.num_prompt_tokens_computed, runner.num_graph_steps,
         runner.num_eager_steps) = counters


def measure_step_time(engine) -> tuple[StepTimeModel, list[dict]]:  # noqa: ANN001 (LLMEngine: avoids a cycle)
    kv, runner, device = engine.kv, engine.runner, engine.device
    params = SamplingParams(max_tokens=1)

    def run(decodes: int, context: int, chunk: int, chunk_context: int, prompts: int) -> float:
        requests, chunks = [], []
        try:
            for i in range(decodes):
                request = Request(f"__profile-d{i}", [1] * (context + 1), params)
                requests.append(request)
                if not kv.allocate_slots(request, context + 1):
                    raise RuntimeError("the step-time profile does not fit the KV cache")
                request.num_computed_tokens = context
                chunks.append(ScheduledChunk(request, context, 1, kv.block_ids(request.request_id), False))
            for i in range(prompts if chunk else 0):
                request = Request(f"__profile-p{i}", [2] * (chunk_context + chunk), params)
                requests.append(request)
                if not kv.allocate_slots(request, chunk_context + chunk):
                    raise RuntimeError("the step-time profile does not fit the KV cache")
                request.num_computed_tokens = chunk_context
                chunks.append(ScheduledChunk(request, chunk_context, chunk, kv.block_ids(request.request_id), False))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            runner.run_dummy_prefill(chunks)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start
        finally:
            for request in requests:
                kv.free(request)

    capacity = (kv.pool.num_usable_blocks - 1) * kv.block_size
    return profile_step_time(run, max_tokens=min(engine.config.max_num_batched_tokens, engine.max_model_len - 1),
                             max_decodes=engine.config.max_num_seqs, max_context=engine.max_model_len - 1,
                             kv_capacity_tokens=capacity)

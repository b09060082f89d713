"""CUDA graphs of the decode forward pass, one per padded batch size, captured at start-up.

A decode step of ``n`` sequences replays the graph of the smallest captured size ``>= n``; the extra
rows are dummies that read and write only the null block. Graphs share one memory pool and read their
inputs from the runner's persistent :class:`StepInputs` buffers, so a replay costs one launch instead of
hundreds. Capture sizes: 1, 2, 4, 8, then every multiple of 16 up to ``max_num_seqs``.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.step_inputs import StepInputs

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: DecoderForCausalLM, kv_caches: list[torch.Tensor], inputs: StepInputs,
                 sizes: list[int], num_splits_for: Callable[[int], int]) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.inputs = inputs
        self.sizes = sorted(sizes)
        self.num_splits_for = num_splits_for
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def padded_size(self, num_seqs: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[i] if i < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: later graphs reuse its pool memory
            metadata = self.inputs.load_dummy_decode(size, self.num_splits_for(size))
            ids, pos = self.inputs.input_ids[:size], self.inputs.positions[:size]
            self.model(ids, pos, self.kv_caches, metadata)  # warm-up: compiles kernels, sets up cuBLAS
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self.model(ids, pos, self.kv_caches, metadata)
            self._graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d decode CUDA graphs in %.1f s", len(self.sizes), self.capture_seconds)

    def replay(self, padded_size: int) -> torch.Tensor:
        """Run the graph of ``padded_size`` (inputs already loaded) and return its hidden states."""
        self._graphs[padded_size].replay()
        return self._outputs[padded_size]

"""CUDA graphs of the forward pass for every step shape -- decode, prefill and mixed -- captured at start-up.

A step of ``n`` tokens replays the graph of the smallest captured token count ``>= n``; the rows past
the batch are padding that writes only the null block and whose outputs are dropped. The attention
kernels read their live counts (decode sequences, prefill query tiles) from device memory and launch
a grid fixed by the graph's :class:`LaunchShape`, so a graph serves any mix of decodes and prefill
chunks with that many tokens. Graphs share one memory pool and read their inputs from the runner's
persistent :class:`StepInputs` buffers, so a replay costs one launch instead of hundreds.

Every size is captured twice: with the launches a step that splits its attention's keys needs (the
split decode programs and the merges) and without them, so that a step splitting nothing (most of them)
replays exactly the launches it needs (``LaunchShape.kv_split``, set by ``StepInputs.load``).

Sizes: 1, 2, 4, 8, every multiple of 16 up to 256 (decode batches and short prompts), then steps of
64 up to 512, 128 up to 1024 and 256 beyond, up to the largest step the engine may run through a graph;
larger steps run eagerly, where the GPU work (tens of ms) hides the launches anyway.

After capture every graph is timed on padding (:meth:`StepGraphs.time_replays`), and a step replays the
*fastest* graph that holds it, not always the smallest: cuBLAS picks its kernel by the row count, and
some counts get a poor one (on an H200 with Llama-3.1-8B shapes the 448-row graph took 13.6 ms against
10.3 ms for the 512-row one: its gate/up product ran at 0.29 ms a layer against 0.18). Only the
token-dependent work (matrix products, norms, activations) shows on padding; the attention of a real
step does not depend on which graph runs it.

A tensor-parallel model captures a graph per rank for each size
(:meth:`~pdserve.engine.tensor_parallel.TensorParallelModel.capture_graph`), each rank with a memory
pool on its own GPU and its own copy of the step inputs (made here, before the first capture).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time

import torch

from pdserve.engine.attention.metadata import LaunchShape
from pdserve.engine.model.interface import CausalLM
from pdserve.engine.step_inputs import StepInputs
from pdserve.engine.tensor_parallel import TensorParallelGraph, TensorParallelModel

logger = logging.getLogger(__name__)


def fastest_covering(times: list[float], margin: float) -> list[int]:
    """For graphs ordered by size with replay ``times``: the index of the graph each one's steps should
    replay. From the largest down, a graph is the best for its size and every smaller one until a smaller
    graph comes within ``margin`` (a share) of it; so a size keeps its own graph unless a larger one
    replays more than ``margin`` faster."""
    choice = list(range(len(times)))
    best = len(times) - 1
    for i in range(len(times) - 1, -1, -1):
        if times[i] * (1 - margin) <= times[best]:
            best = i
        choice[i] = best
    return choice


class StepGraphs:
    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], inputs: StepInputs,
                 shapes: list[LaunchShape]) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.inputs = inputs
        self.shapes = sorted(shapes, key=lambda s: s.num_tokens)
        self._sizes = [s.num_tokens for s in self.shapes]
        # (size, with the KV-split paths) -> graph and its output rows
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph | TensorParallelGraph] = {}
        self._outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.replay_ms: dict[int, float] = {}  # graph size -> its replay on padding (time_replays)
        self._choice = list(range(len(self.shapes)))  # index of the smallest fitting graph -> the one to run

    @property
    def max_tokens(self) -> int:
        return self._sizes[-1]

    def shape_for(self, num_tokens: int) -> LaunchShape | None:
        """The captured shape a step of ``num_tokens`` tokens replays (``None``: run it eagerly)."""
        i = bisect.bisect_left(self._sizes, num_tokens)
        return self.shapes[self._choice[i]] if i < len(self.shapes) else None

    @property
    def padded_sizes(self) -> tuple[int, ...]:
        """The distinct row counts replayed steps compute, ascending (a size rerouted to a larger graph
        is not one: its steps compute the larger graph's rows)."""
        return tuple(sorted({self._sizes[c] for c in self._choice}))

    @property
    def rerouted(self) -> dict[int, int]:
        """Graph sizes a step does not replay -> the larger graph it replays instead."""
        return {self._sizes[i]: self._sizes[c] for i, c in enumerate(self._choice) if c != i}

    @torch.inference_mode()
    def time_replays(self, repeats: int = 3, margin: float = 0.03) -> None:
        """Time every graph's replay on padding (median of ``repeats``, after a warm-up) and route each
        size to the fastest graph at least as large: a larger graph is taken when it is more than
        ``margin`` (a share) faster."""
        start = time.perf_counter()
        for shape in self.shapes:
            self.inputs.load_padding(shape)
            self.replay(shape)
            times = []
            for _ in range(repeats):
                self._synchronize()
                began = time.perf_counter()
                self.replay(shape)
                self._synchronize()
                times.append(time.perf_counter() - began)
            self.replay_ms[shape.num_tokens] = sorted(times)[len(times) // 2] * 1e3
        self._choice = fastest_covering([self.replay_ms[size] for size in self._sizes], margin)
        for small, large in self.rerouted.items():
            logger.info("the %d-token CUDA graph replays in %.2f ms, the %d-token one in %.2f ms: steps of "
                        "up to %d tokens take the larger", small, self.replay_ms[small], large,
                        self.replay_ms[large], small)
        self.capture_seconds += time.perf_counter() - start

    def _synchronize(self) -> None:
        devices = self.model.devices if isinstance(self.model, TensorParallelModel) else [None]
        for device in devices:
            torch.cuda.synchronize(device)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        tensor_parallel = self.model if isinstance(self.model, TensorParallelModel) else None
        rank_pools = []
        if tensor_parallel is not None:
            for device in tensor_parallel.devices[1 + len(self.inputs.ranks):]:
                self.inputs.add_rank(device)
            rank_pools = [pool] + [torch.cuda.graph_pool_handle() for _ in tensor_parallel.devices[1:]]
        variants = [dataclasses.replace(s, kv_split=split) for s in reversed(self.shapes) for split in (True, False)]
        for shape in variants:  # largest first: later graphs reuse its pool memory
            key = (shape.num_tokens, shape.kv_split)
            metadata = self.inputs.load_padding(shape)
            ids, pos = self.inputs.input_ids[: shape.num_tokens], self.inputs.positions[: shape.num_tokens]
            if tensor_parallel is not None:
                inputs = [(ids, pos, metadata)] + [(rank.view_of(ids), rank.view_of(pos), rank.metadata(metadata))
                                                   for rank in self.inputs.ranks]
                ranks_graph = tensor_parallel.capture_graph(inputs, rank_pools)
                self._graphs[key], self._outputs[key] = ranks_graph, ranks_graph.output
                continue
            self.model(ids, pos, self.kv_caches, metadata)  # warm-up: compiles kernels, sets up cuBLAS
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[key] = self.model(ids, pos, self.kv_caches, metadata)
            self._graphs[key] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d CUDA graphs (1 to %d tokens, with and without KV splits) in %.1f s",
                    len(variants), self.max_tokens, self.capture_seconds)

    def replay(self, shape: LaunchShape) -> torch.Tensor:
        """Run the graph of ``shape`` (inputs already loaded; its ``kv_split`` variant) and return its
        hidden states (all rows)."""
        key = (shape.num_tokens, shape.kv_split)
        self._graphs[key].replay()
        return self._outputs[key]

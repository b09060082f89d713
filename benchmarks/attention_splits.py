"""Attention of one step (32 layers, Llama-3.1-8B heads, bf16, paged cache) as its CUDA graph runs it:
with every sequence's keys in one piece, and split as the engine's :class:`KVSplitRule` chooses.

Decodes of one context, or ragged ones (a serving batch: ShareGPT-like contexts, or one long conversation
among short ones), where the engine's two decode rules differ: every decode split alike (``alike``) or each
by its own context when they are ragged (``balanced``, the default; ``PDSERVE_BALANCED_DECODE_SPLITS=0`` turns
it off in the engine).

A graph's launch is sized for its token count (``graph_launch_shape``): the graph of a 512-token step has
room for 256 decodes, so before the split counts were chosen per step, a few long decodes beside a
prompt chunk -- or the chunk's own one or two query tiles over a long context -- went to a handful of
programs each. Every case is captured as a CUDA graph of 32 layer calls (each layer its own cache) and
replayed; the variants differ only in the split counts the step writes to device memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from benchmarks.common import _median_ms, markdown_table, measure_ceilings, run_info, write_results
from pdserve.engine.kernels.paged_decode import (
    MAX_SPLITS,
    choose_num_splits,
    fill_split_items,
    paged_decode_attention,
)
from pdserve.engine.kernels.paged_prefill import build_query_tiles, paged_prefill_attention, query_tile_rows
from pdserve.engine.kv_splits import KVSplitRule, graph_launch_shape
from pdserve.engine.step_inputs import StepCounts

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS, MAX_SEQS, MAX_MODEL_LEN = 32, 8, 128, 16, 32, 256, 16384


def sharegpt_contexts(n: int, seed: int) -> list[int]:
    """Contexts of ``n`` decodes of a ShareGPT-like load mid-stream: a lognormal prompt (median 170) plus
    part of a lognormal output (median 150), as ``benchmarks.serving.workload`` draws them."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(math.log(170), 0.9, n), 4, 2048)
    outputs = np.clip(rng.lognormal(math.log(150), 0.9, n), 4, 1024)
    return [int(p + rng.uniform(0, o)) for p, o in zip(prompts, outputs, strict=True)]


#: (name, decodes, decode context (one for all, or each decode's), prompt chunks as (tokens, context), graph size)
CASES: list[tuple[str, int, int | list[int], list[tuple[int, int]], int]] = [
    ("decode 1 @1k", 1, 1024, [], 1),
    ("decode 1 @8k", 1, 8192, [], 1),
    ("decode 16 @2k", 16, 2048, [], 16),
    ("decode 8 @4k", 8, 4096, [], 8),
    ("decode 12 @2k", 12, 2048, [], 16),
    ("decode 32 @4k", 32, 4096, [], 32),
    ("decode 64 @1k", 64, 1024, [], 64),
    ("decode 256 @1k", 256, 1024, [], 256),
    ("6 @2k + 102 after 1946", 6, 2048, [(102, 1946)], 112),
    ("9 @2k + 400 after 1417", 9, 2048, [(400, 1417)], 512),
    ("5 @2k + 874 after 486", 5, 2048, [(874, 486)], 896),
    ("32 @2k + 512 after 1k", 32, 2048, [(512, 1024)], 640),
    ("64 @1k + 256 after 1k", 64, 1024, [(256, 1024)], 320),
    ("200 @600 + 128 fresh", 200, 600, [(128, 0)], 384),
    ("prefill 512 fresh", 0, 0, [(512, 0)], 512),
    ("prefill 128 after 4k", 0, 0, [(128, 4096)], 128),
    ("ragged 1 @2k + 28 @100", 29, [2000] + [100] * 28, [], 32),
    ("sharegpt-like 17", 17, sharegpt_contexts(17, 1), [], 32),
    ("sharegpt-like 33", 33, sharegpt_contexts(33, 2), [], 48),
    ("sharegpt-like 64", 64, sharegpt_contexts(64, 3), [], 64),
    ("sharegpt-like 128", 128, sharegpt_contexts(128, 4), [], 128),
    ("sharegpt-like 33 + 256 fresh", 33, sharegpt_contexts(33, 5), [(256, 0)], 320),
]


class Step:
    """One step's attention inputs on the GPU: per-layer caches, block tables, counts, query tiles."""

    def __init__(self, decodes: int, decode_context: int | list[int], chunks: list[tuple[int, int]],
                 graph: int) -> None:
        dev = "cuda"
        contexts = [decode_context] * decodes if isinstance(decode_context, int) else list(decode_context)
        lens = [(1, c) for c in contexts] + list(chunks)  # (new tokens, context) per sequence
        seq_lens = [q + c for q, c in lens]
        blocks = [math.ceil(s / BLOCK) for s in seq_lens]
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(sum(blocks), generator=gen) + 1
        self.tables = torch.zeros((MAX_SEQS + len(chunks), max(blocks)), dtype=torch.int32)
        start = 0
        for i, n in enumerate(blocks):
            self.tables[i, :n] = perm[start:start + n].to(torch.int32)
            start += n
        self.tables = self.tables.to(dev)
        self.caches = [torch.randn(2, sum(blocks) + 1, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
                       for _ in range(LAYERS)]
        rows = graph
        self.query = torch.randn(rows, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
        self.out = torch.zeros_like(self.query)
        qsl = [0]
        for q, _ in lens:
            qsl.append(qsl[-1] + q)
        self.query_start = torch.tensor(qsl, dtype=torch.int32, device=dev)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        tile_rows = query_tile_rows(HEAD_DIM, torch.bfloat16)
        host = np.zeros((2, graph // tile_rows + 8 + MAX_SEQS), dtype=np.int32)
        num_tiles = build_query_tiles(np.array([q for q, _ in chunks], dtype=np.int64), decodes, tile_rows, host)
        self.tiles = torch.from_numpy(host).to(dev)
        self.launch = graph_launch_shape(graph, MAX_SEQS, tile_rows, KV_HEADS, torch.cuda.get_device_properties(0)
                                         .multi_processor_count)
        self.counts_of = StepCounts(sum(q for q, _ in lens), decodes, num_tiles, max(seq_lens),
                                    max_decode_seq_len=max(contexts) + 1 if decodes else 0,
                                    max_chunk_seq_len=max((q + c for q, c in chunks), default=0),
                                    decode_seq_lens=np.array([c + 1 for c in contexts], dtype=np.int32))
        self.counts = torch.tensor([decodes, num_tiles, 1, 1], dtype=torch.int32, device=dev)
        self.item_starts = torch.zeros(MAX_SEQS + 1, dtype=torch.int32, device=dev)
        self.item_seq = torch.zeros(MAX_SEQS * MAX_SPLITS, dtype=torch.int32, device=dev)

    def attention(self, split_paths: bool, item_table: bool = False) -> None:
        """The step's attention as its graph runs it: with the split launches, or without (the graph a
        step that splits nothing replays); ``item_table``: each decode's split count from the item table
        (the balanced rule's kernels), else every decode ``counts[2]`` ways."""
        cap, launch = self.launch.decode_capacity, self.launch
        for cache in self.caches:
            paged_decode_attention(self.query[:cap], cache, self.tables[:cap], self.seq_lens[:cap], scale=0.088,
                                   sliding_window=None, num_splits=self.counts[2:3], may_split=split_paths,
                                   num_programs=launch.decode_programs, num_active=self.counts[0:1],
                                   out=self.out[:cap], items=(self.item_starts, self.item_seq) if item_table else None)
            if launch.prefill_programs:
                paged_prefill_attention(self.query, cache, self.tables, self.seq_lens, self.query_start,
                                        scale=0.088, sliding_window=None, tiles=self.tiles,
                                        num_tiles=self.counts[1:2], num_programs=launch.prefill_programs,
                                        num_splits=self.counts[3:4], may_split=split_paths, out=self.out)

    def timed(self, graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph], decode_splits: np.ndarray,
              prefill_splits: int, item_table: bool = False) -> tuple[float, torch.Tensor]:
        """The step's attention replayed with these splits (of each decode; per query tile)."""
        most = int(decode_splits.max()) if len(decode_splits) else 1
        self.counts[2], self.counts[3] = most, prefill_splits
        starts, items = np.zeros(MAX_SEQS + 1, dtype=np.int32), np.zeros(MAX_SEQS * MAX_SPLITS, dtype=np.int32)
        fill_split_items(decode_splits, starts, items)
        self.item_starts.copy_(torch.from_numpy(starts))
        self.item_seq.copy_(torch.from_numpy(items))
        split = (most, prefill_splits) != (1, 1)
        graph = graphs[(split, item_table and split)]
        graph.replay()
        torch.cuda.synchronize()
        rows = self.counts_of.num_tokens
        return _median_ms(graph.replay, 20), self.out[:rows].float().clone()


def run_case(name: str, decodes: int, context: int | list[int], chunks: list[tuple[int, int]], graph_size: int,
             rule: KVSplitRule) -> dict[str, Any]:
    step = Step(decodes, context, chunks, graph_size)
    graph: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = {}
    for variant in ((False, False), (True, False), (True, True)):  # (split paths, item table)
        step.attention(*variant)  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph[variant] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph[variant]):
            step.attention(*variant)
    alike = dataclasses.replace(rule, balanced=False)(step.counts_of, step.launch)
    balanced = dataclasses.replace(rule, balanced=True)(step.counts_of, step.launch)
    # before per-step splits: a graph's decodes split as its capacity at the longest context asked, chunks never
    old_decode = max(1, min(choose_num_splits(step.launch.decode_capacity, KV_HEADS, MAX_MODEL_LEN, rule.num_sms),
                            step.launch.decode_programs // max(decodes, 1)))
    whole_ms, whole = step.timed(graph, np.ones(decodes, dtype=np.int32), 1)
    old_ms, old = step.timed(graph, np.full(decodes, old_decode, dtype=np.int32), 1)
    rule_ms, split = step.timed(graph, *alike)
    table_ms, _ = step.timed(graph, *alike, item_table=True)  # the same splits read from the table
    balanced_ms, even = step.timed(graph, *balanced, item_table=True)
    row = {"case": name, "graph": graph_size, "splits": [int(alike[0].max(initial=1)), alike[1]],
           "balanced_splits": [int(balanced[0].min()) if decodes else 0, int(balanced[0].max(initial=1)),
                               int(balanced[0].sum())],
           "before_splits": [old_decode, 1],
           "whole_ms": round(whole_ms, 3), "before_ms": round(old_ms, 3), "split_ms": round(rule_ms, 3),
           "table_ms": round(table_ms, 3), "balanced_ms": round(balanced_ms, 3),
           "speedup_vs_before": round(old_ms / rule_ms, 2),
           "balanced_speedup": round(rule_ms / balanced_ms, 2),
           "max_abs_diff": float((split - whole).abs().max()), "before_max_abs_diff": float((old - whole).abs().max()),
           "balanced_max_abs_diff": float((even - whole).abs().max())}
    print(row, flush=True)
    del step, graph
    torch.cuda.empty_cache()
    return row


def main() -> None:
    info = run_info()
    ceilings = measure_ceilings()
    rule = KVSplitRule(KV_HEADS, torch.cuda.get_device_properties(0).multi_processor_count, HEADS)
    rows = [run_case(*case, rule=rule) for case in CASES]
    markdown = "\n".join([
        "# Attention KV splits per step (32 layers, Llama-3.1-8B heads, CUDA graph)", "",
        f"{info.get('device')} · commit {info['commit']} · {info['date']} · ceilings {ceilings}", "",
        "Command: `python -m benchmarks.attention_splits`. `before`: the splits a graph froze before they were "
        "chosen per step (decodes split only in graphs of <= 32 rows, by the longest context the engine allows; "
        "prompt chunks never); `whole`: no split at all; `split`: `KVSplitRule`, every decode alike (decode, "
        "prefill splits), also read from the item table the balanced kernels use; `balanced`: the engine's default, each decode "
        "by its own context where the contexts are ragged, else alike (fewest / most splits of a decode, items).", "",
        markdown_table(["case", "graph", "splits (decode, prefill)", "whole ms", "before ms", "split ms",
                        "before / split", "split ms (item table)", "balanced splits", "balanced ms",
                        "split / balanced", "max |diff|"],
                       [[r["case"], r["graph"], tuple(r["splits"]), r["whole_ms"], r["before_ms"], r["split_ms"],
                         r["speedup_vs_before"], r["table_ms"], tuple(r["balanced_splits"]), r["balanced_ms"],
                         r["balanced_speedup"],
                         f"{max(r['max_abs_diff'], r['balanced_max_abs_diff']):.2g}"] for r in rows]), ""])
    print(markdown)
    print("wrote", *write_results("attention_splits", info, {"ceilings": ceilings, "cases": rows}, markdown))


if __name__ == "__main__":
    main()

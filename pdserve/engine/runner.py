"""Turn a :class:`SchedulerPlan` into tensors, run the model, sample. Never calls back into the scheduler.

One step (:meth:`ModelRunner.launch`): order the chunks decodes-first, write their inputs into the
persistent buffers (one async copy each to the device), run the forward pass -- by replaying the CUDA
graph of the smallest captured token count that fits the step, whatever its mix of decodes and
prefill chunks, or eagerly when the step is larger than every graph (or graphs are off) -- take the
hidden state of the last row of each chunk that samples, compute logits for those rows only, and
sample. Nothing waits for the device: the sampled ids stay there (the next step may read them as
inputs) and are copied to the host in the background; :meth:`LaunchedStep.token_ids` waits for them.

The model's optional per-layer hook (``CausalLM.layer_hook``, installed per step by the
engine from its ``step_hooks``) lets the prefill role stream each layer's freshly written KV while
later layers compute. A graph replay cannot stop between layers, so after a replay the hook is called
for every layer in order (the KV of short prompts is sent once their whole forward pass is queued).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.common.graph_sizes import capture_sizes
from pdserve.common.outputs import TokenLogprobs
from pdserve.engine.attention.metadata import AttentionMetadata, LaunchShape
from pdserve.engine.cuda_graphs import StepGraphs
from pdserve.engine.kv_splits import KVSplitRule, graph_launch_shape
from pdserve.engine.model.interface import CausalLM
from pdserve.engine.sampler import SampledTokens, Sampler, SamplingRow
from pdserve.engine.step_inputs import FedTokens, StepCounts, StepInputs
from pdserve.engine.step_plan import ScheduledChunk, SchedulerPlan

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class LaunchedStep:
    """A step whose forward pass and sampling are queued on the device.

    ``sampling`` lists the chunks that sample, in the order of the rows of ``sampled``.
    """

    plan: SchedulerPlan
    sampling: list[ScheduledChunk]
    sampled: SampledTokens | None
    num_forward_tokens: int
    clock: tuple[Any, Any] | None = None  # (start, end): CUDA events, or host seconds on the CPU

    def seconds(self) -> float | None:
        """How long the step took on the device (from the moment the device reached it); after the
        tokens were read, and only for a step launched with ``timed=True``."""
        if self.clock is None:
            return None
        start, end = self.clock
        if isinstance(start, float):
            return end - start
        if not end.query():  # a step that samples nothing is never waited for: skip it if not done
            return None
        return start.elapsed_time(end) / 1e3

    def is_done(self) -> bool:
        """Whether reading the tokens would not wait for the device."""
        return self.sampled is None or self.sampled.is_ready()

    def running(self) -> bool:
        """Whether the device is still at this step: its end event not reached (a step that samples nothing
        too), or, launched untimed, its tokens not ready."""
        if self.clock is not None and not isinstance(self.clock[0], float):
            return not self.clock[1].query()
        return not self.is_done()

    def token_ids(self) -> list[int]:
        """The sampled ids in ``sampling`` order (waits for the device)."""
        return [] if self.sampled is None else self.sampled.resolve().token_ids

    def logprobs(self) -> list[TokenLogprobs | None]:
        return [] if self.sampled is None else self.sampled.resolve().logprobs


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, sampler: Sampler, eos_token_ids: tuple[int, ...], *,
                 max_num_tokens: int, max_num_seqs: int, max_model_len: int,
                 query_tile_rows: int | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.inputs = StepInputs(max(max_num_tokens, max_num_seqs), max_num_seqs,
                                 -(-max_model_len // block_size), block_size, device, query_tile_rows)
        self.set_num_sms(torch.cuda.get_device_properties(device).multi_processor_count
                         if device.type == "cuda" else 1)
        self.query_tile_rows = query_tile_rows
        self.num_kv_heads = model.spec.num_kv_heads
        self.graphs: StepGraphs | None = None
        self._fed: FedTokens | None = None  # the last launched step's sampled ids (next step's inputs)
        self.num_forward_tokens = 0  # cumulative count of tokens run through the model (a metric)
        self.num_prompt_tokens_computed = 0  # of those, prompt positions: prefill work done on this engine
        self.num_graph_steps = 0
        self.num_eager_steps = 0
        self.host_stamps: dict[str, float] = {}  # phase -> perf_counter() at its end, of the last launch

    def set_num_sms(self, num_sms: int) -> None:
        """The multiprocessors the attention's KV splits fill (the device's; tests pretend more, so that
        the CPU runs the split paths)."""
        self.num_sms = num_sms
        spec = self.model.spec  # a rank's share of the heads under tensor parallelism
        self.kv_splits = KVSplitRule(spec.num_kv_heads, num_sms, spec.num_heads)
        self.inputs.kv_splits = self.kv_splits
        self.inputs.split_item_table = self.kv_splits.balanced  # decodes split unequally: the table kernels

    # ---- set-up --------------------------------------------------------------------------------

    def capture_cuda_graphs(self, max_num_seqs: int, max_graph_tokens: int) -> float:
        """Capture graphs for every padded step size up to ``max_graph_tokens`` tokens (and every decode
        batch); returns the seconds it took."""
        limit = min(max_graph_tokens, self.inputs.max_tokens)
        sizes = [s for s in capture_sizes(max_num_seqs, limit) if s <= self.inputs.max_tokens]
        self.graphs = StepGraphs(self.model, self.kv_caches, self.inputs, [self.graph_shape(s) for s in sizes])
        self.graphs.capture()
        self.graphs.time_replays()
        return self.graphs.capture_seconds

    def graph_shape(self, num_tokens: int) -> LaunchShape:
        """The launch shape of the graph for ``num_tokens`` padded tokens (``graph_launch_shape``)."""
        return graph_launch_shape(num_tokens, self.max_num_seqs, self.query_tile_rows, self.num_kv_heads,
                                  self.num_sms)

    def _eager_shape(self, counts: StepCounts) -> LaunchShape:
        splits = self.kv_splits.decode_splits(counts.num_decodes, counts.max_decode_seq_len)
        return LaunchShape(counts.num_tokens, counts.num_decodes, counts.num_decodes * splits,
                           counts.num_query_tiles, batch_specific=True)

    def padded_sizes(self) -> tuple[int, ...]:
        """The distinct row counts steps replaying a graph compute, ascending (empty: no graphs); a step
        computes the smallest that holds it (``graph_sizes.padded_rows``), as :meth:`graph_rows` says."""
        return () if self.graphs is None else self.graphs.padded_sizes

    def graph_rows(self, num_tokens: int) -> int:
        """Rows a step of ``num_tokens`` tokens computes: its CUDA graph's padded size, or itself when it
        runs eagerly."""
        shape = self.graphs.shape_for(num_tokens) if self.graphs is not None else None
        return num_tokens if shape is None else shape.num_tokens

    # ---- one step ------------------------------------------------------------------------------

    def forward(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Run the model over ``chunks`` (decodes first); returns hidden states of the real rows."""
        num_tokens = sum(c.num_tokens for c in chunks)
        shape = self.graphs.shape_for(num_tokens) if self.graphs is not None else None
        if shape is not None:
            assert self.graphs is not None
            metadata = self.inputs.load(chunks, lambda _: shape, self._fed)
            assert metadata.launch is not None
            hidden = self.graphs.replay(metadata.launch)[:num_tokens]  # the variant with splits if any
            hook = self.model.layer_hook
            if hook is not None:
                for index, kv_cache in enumerate(self.kv_caches):
                    hook(index, kv_cache)
            self.num_graph_steps += 1
        else:
            metadata = self.inputs.load(chunks, self._eager_shape, self._fed)
            self.host_stamps["inputs"] = time.perf_counter()
            rows = metadata.launch.num_tokens if metadata.launch is not None else num_tokens
            hidden = self.model(self.inputs.input_ids[:rows], self.inputs.positions[:rows], self.kv_caches,
                                metadata)[:num_tokens]
            self.num_eager_steps += 1
        self.num_forward_tokens += num_tokens
        self.num_prompt_tokens_computed += sum(
            max(0, min(c.start + c.num_tokens, c.request.num_prompt_tokens) - c.start) for c in chunks)
        return hidden, metadata

    @torch.inference_mode()
    def launch(self, plan: SchedulerPlan, timed: bool = False) -> LaunchedStep:
        """Queue the plan's forward pass and sampling on the device; wait for nothing. ``timed``: record
        the step's device span (:meth:`LaunchedStep.seconds`)."""
        start = self._clock() if timed else None
        step = self._launch(plan)
        if start is not None:
            step.clock = (start, self._clock())
        return step

    def _clock(self) -> Any:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def host_breakdown_ms(self) -> dict[str, float]:
        """Where the host time of the last launch went (ms per phase, in order): for slow-step reports."""
        stamps = list(self.host_stamps.items())
        return {name: round((t - stamps[i - 1][1]) * 1e3, 2) for i, (name, t) in enumerate(stamps) if i}

    def _launch(self, plan: SchedulerPlan) -> LaunchedStep:
        self.host_stamps = {"start": time.perf_counter()}
        chunks = sorted(plan.chunks, key=lambda c: c.num_tokens != 1)  # stable: decodes first
        hidden, metadata = self.forward(chunks)
        self.host_stamps["forward"] = time.perf_counter()
        sampling = [c for c in chunks if c.samples]
        if not sampling:
            return LaunchedStep(plan, [], None, metadata.num_tokens)
        ends = metadata.query_start_loc_cpu
        rows = [ends[i + 1] - 1 for i, c in enumerate(chunks) if c.samples]
        if rows == list(range(len(rows))) and len(rows) == hidden.shape[0]:
            selected = hidden
        else:
            index = torch.tensor(rows, dtype=torch.long, pin_memory=self.device.type == "cuda")
            selected = hidden.index_select(0, index.to(self.device, non_blocking=True))
        logits = self.model.compute_logits(selected)
        rows_info = [SamplingRow(c.request.request_id, c.request.params, c.request.prompt_token_ids,
                                 c.request.output_token_ids, self.eos_token_ids, c.request.num_pending_tokens)
                     for c in sampling]
        sampled = self.sampler.sample_async(logits, rows_info)
        self._fed = FedTokens(sampled.token_ids, {c.request.request_id: i for i, c in enumerate(sampling)})
        return LaunchedStep(plan, sampling, sampled, metadata.num_tokens)

    # ---- profiling -----------------------------------------------------------------------------

    @torch.inference_mode()
    def run_dummy_prefill(self, chunks: list[ScheduledChunk]) -> None:
        """Forward ``chunks`` without sampling (memory profiling and warm-up)."""
        self.forward(chunks)

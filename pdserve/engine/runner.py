"""Turn a :class:`SchedulerPlan` into tensors, run the model, sample. Never calls back into the scheduler.

One step: order the chunks decodes-first, write their inputs into the persistent buffers (one async
copy each to the device), run the forward pass (which writes the new KV) -- by replaying a captured
CUDA graph when every chunk is a decode and a graph of that size exists -- take the hidden state of the
last row of each chunk that samples, compute logits for those rows only, and sample. The host
receives the sampled ids once per step.

The model's optional per-layer hook (``DecoderForCausalLM.layer_hook``, installed per step by the
engine from its ``step_hooks``) lets the prefill role stream each layer's freshly written KV while
later layers compute; the runner itself does nothing with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pdserve.common.outputs import TokenLogprobs
from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.cuda_graphs import DecodeGraphs, capture_sizes
from pdserve.engine.kernels.paged_decode import choose_num_splits
from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.sampler import Sampler, SamplingRow
from pdserve.engine.scheduler import ScheduledChunk, SchedulerPlan
from pdserve.engine.step_inputs import StepInputs

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Sampled tokens of the chunks that sample, keyed by request id."""

    token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs | None]
    num_forward_tokens: int = 0


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, sampler: Sampler, eos_token_ids: tuple[int, ...], *,
                 max_num_tokens: int, max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.inputs = StepInputs(max(max_num_tokens, max_num_seqs), max_num_seqs,
                                 -(-max_model_len // block_size), block_size, device)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.num_kv_heads = model.spec.num_kv_heads
        self.graphs: DecodeGraphs | None = None
        self.num_forward_tokens = 0  # cumulative count of tokens run through the model (a metric)
        self.num_prompt_tokens_computed = 0  # of those, prompt positions: prefill work done on this engine
        self.num_graph_steps = 0
        self.num_eager_steps = 0

    # ---- set-up --------------------------------------------------------------------------------

    def capture_cuda_graphs(self, max_num_seqs: int) -> float:
        """Capture decode graphs for every padded batch size; returns the seconds it took."""
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.inputs, capture_sizes(max_num_seqs),
                                   lambda n: self._decode_splits(n, self.max_model_len))
        self.graphs.capture()
        return self.graphs.capture_seconds

    def _decode_splits(self, num_decodes: int, max_seq_len: int) -> int:
        return choose_num_splits(num_decodes, self.num_kv_heads, max_seq_len, self.num_sms)

    # ---- one step ------------------------------------------------------------------------------

    def forward(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Run the model over ``chunks`` (decodes first); returns hidden states of the real rows."""
        num_decodes = sum(1 for c in chunks if c.num_tokens == 1)
        all_decode = num_decodes == len(chunks)
        padded = self.graphs.padded_size(len(chunks)) if (self.graphs is not None and all_decode) else None
        if padded is not None:
            metadata = self.inputs.load(chunks, self.graphs.num_splits_for(padded), pad_seqs_to=padded)  # type: ignore[union-attr]
            hidden = self.graphs.replay(padded)[: len(chunks)]  # type: ignore[union-attr]
            self.num_graph_steps += 1
        else:
            max_seq = max(c.start + c.num_tokens for c in chunks)
            metadata = self.inputs.load(chunks, self._decode_splits(num_decodes, max_seq))
            hidden = self.model(self.inputs.input_ids[: metadata.num_tokens],
                                self.inputs.positions[: metadata.num_tokens], self.kv_caches, metadata)
            self.num_eager_steps += 1
        self.num_forward_tokens += sum(c.num_tokens for c in chunks)
        self.num_prompt_tokens_computed += sum(
            max(0, min(c.start + c.num_tokens, c.request.num_prompt_tokens) - c.start) for c in chunks)
        return hidden, metadata

    @torch.inference_mode()
    def execute(self, plan: SchedulerPlan) -> StepResult:
        chunks = sorted(plan.chunks, key=lambda c: c.num_tokens != 1)  # stable: decodes first
        hidden, metadata = self.forward(chunks)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        if not sampling:
            return StepResult({}, {}, metadata.num_tokens)
        ends = metadata.query_start_loc_cpu
        rows = [ends[i + 1] - 1 for i in sampling]
        if rows == list(range(len(chunks))):
            selected = hidden
        else:
            selected = hidden[torch.tensor(rows, device=hidden.device)]
        logits = self.model.compute_logits(selected)
        sampled = [chunks[i] for i in sampling]
        rows_info = [SamplingRow(c.request.request_id, c.request.params, c.request.prompt_token_ids,
                                 c.request.output_token_ids, self.eos_token_ids) for c in sampled]
        out = self.sampler.sample(logits, rows_info)
        ids = [c.request.request_id for c in sampled]
        return StepResult(dict(zip(ids, out.token_ids)), dict(zip(ids, out.logprobs)), metadata.num_tokens)

    # ---- profiling -----------------------------------------------------------------------------

    @torch.inference_mode()
    def run_dummy_prefill(self, chunks: list[ScheduledChunk]) -> None:
        """Forward ``chunks`` without sampling (memory profiling and warm-up)."""
        self.forward(chunks)

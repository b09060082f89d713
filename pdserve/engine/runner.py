"""Turn a :class:`SchedulerPlan` into tensors, run the model, sample. Never calls back into the scheduler.

One step: pack every chunk's new tokens back to back (``input_ids``, ``positions``), map each to its
cache slot, build the attention metadata, run the forward pass (which writes the new KV), take the
hidden state of the last row of each chunk that samples, compute logits for those rows only, and
sample. The host receives the sampled ids once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.common.outputs import TokenLogprobs
from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.sampler import Sampler, SamplingRow
from pdserve.engine.scheduler import SchedulerPlan


@dataclass
class StepResult:
    """Sampled tokens of the chunks that sample, keyed by request id."""

    token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs | None]
    num_forward_tokens: int = 0


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # indices into the packed rows whose logits are sampled


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, sampler: Sampler, eos_token_ids: tuple[int, ...]) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids
        self.num_forward_tokens = 0  # cumulative count of tokens run through the model (a metric)

    def pack(self, plan: SchedulerPlan) -> PackedBatch:
        bs = self.block_size
        ids: list[np.ndarray] = []
        pos: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        max_blocks = max(len(c.block_ids) for c in plan.chunks)
        tables = np.zeros((len(plan.chunks), max_blocks), dtype=np.int32)
        for i, chunk in enumerate(plan.chunks):
            end = chunk.start + chunk.num_tokens
            ids.append(np.asarray(chunk.request.all_token_ids[chunk.start:end], dtype=np.int64))
            p = np.arange(chunk.start, end, dtype=np.int64)
            table = np.asarray(chunk.block_ids, dtype=np.int64)
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            tables[i, : len(chunk.block_ids)] = chunk.block_ids
            query_start.append(query_start[-1] + chunk.num_tokens)
            seq_lens.append(end)
            if chunk.samples:
                sample_rows.append(query_start[-1] - 1)
        to = self._to_device
        query_lens = np.diff(query_start)
        metadata = AttentionMetadata(
            num_tokens=query_start[-1],
            num_seqs=len(plan.chunks),
            max_query_len=int(query_lens.max()),
            max_seq_len=max(seq_lens),
            block_size=bs,
            query_start_loc=to(np.asarray(query_start, dtype=np.int32)),
            seq_lens=to(np.asarray(seq_lens, dtype=np.int32)),
            context_lens=to(np.asarray(seq_lens, dtype=np.int32) - query_lens.astype(np.int32)),
            block_tables=to(tables),
            slot_mapping=to(np.concatenate(slots)),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
        )
        return PackedBatch(to(np.concatenate(ids)), to(np.concatenate(pos)), metadata,
                           to(np.asarray(sample_rows, dtype=np.int64)))

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    @torch.inference_mode()
    def execute(self, plan: SchedulerPlan) -> StepResult:
        batch = self.pack(plan)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata)
        self.num_forward_tokens += batch.metadata.num_tokens
        sampling = [c for c in plan.chunks if c.samples]
        if not sampling:
            return StepResult({}, {}, batch.metadata.num_tokens)
        logits = self.model.compute_logits(hidden[batch.sample_rows])
        rows = [
            SamplingRow(c.request.request_id, c.request.params, c.request.prompt_token_ids,
                        c.request.output_token_ids, self.eos_token_ids)
            for c in sampling
        ]
        out = self.sampler.sample(logits, rows)
        ids = [c.request.request_id for c in sampling]
        return StepResult(dict(zip(ids, out.token_ids)), dict(zip(ids, out.logprobs)), batch.metadata.num_tokens)

"""Persistent input buffers of the model runner: pinned host arrays mirrored by device tensors.

Every step writes its inputs into the host arrays (NumPy views of pinned memory), copies the used
prefix of each to the device asynchronously, and hands out views of the device tensors. The device
tensors never move, so CUDA graphs captured over them replay with each step's new values. On the CPU
the host arrays are the device tensors and nothing is copied.

Token-level int32 buffers: ``input_ids``, ``positions``, ``slot_mapping``; sequence-level:
``query_start_loc``, ``seq_lens``, ``context_lens``, ``block_tables`` ``[max_seqs, max_blocks]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.scheduler import ScheduledChunk


class StepInputs:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device) -> None:
        self.device = device
        self.block_size = block_size
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        pin = device.type == "cuda"
        shapes = {
            "input_ids": (max_tokens,), "positions": (max_tokens,), "slot_mapping": (max_tokens,),
            "query_start_loc": (max_seqs + 1,), "seq_lens": (max_seqs,), "context_lens": (max_seqs,),
            "block_tables": (max_seqs, max_blocks_per_seq),
        }
        self._host = {k: torch.zeros(v, dtype=torch.int32, pin_memory=pin) for k, v in shapes.items()}
        self.np = {k: t.numpy() for k, t in self._host.items()}
        self.dev = ({k: torch.zeros(v, dtype=torch.int32, device=device) for k, v in shapes.items()}
                    if pin else self._host)

    def load(self, chunks: Sequence[ScheduledChunk], decode_num_splits: int,
             pad_seqs_to: int | None = None) -> AttentionMetadata:
        """Write the chunks' inputs and return the step's metadata over device views.

        ``chunks`` must list single-token chunks (decodes) first. ``pad_seqs_to`` appends one-token
        dummy sequences that read and write only the null block (CUDA-graph padding of decode batches;
        only valid when every chunk is a decode).
        """
        bs = self.block_size
        n = self.np
        ids, pos, slots = n["input_ids"], n["positions"], n["slot_mapping"]
        qsl, seq_lens, ctx, tables = n["query_start_loc"], n["seq_lens"], n["context_lens"], n["block_tables"]
        t = 0
        qsl[0] = 0
        width = 1
        num_decodes = 0
        for i, chunk in enumerate(chunks):
            start, count, table = chunk.start, chunk.num_tokens, chunk.block_ids
            end = start + count
            if count == 1:
                num_decodes += num_decodes == i
                ids[t] = chunk.request.all_token_ids[start]
                pos[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                ids[t:t + count] = chunk.request.all_token_ids[start:end]
                p = np.arange(start, end, dtype=np.int32)
                pos[t:t + count] = p
                slots[t:t + count] = np.asarray(table, dtype=np.int32)[p // bs] * bs + p % bs
            t += count
            qsl[i + 1] = t
            seq_lens[i] = end
            ctx[i] = start
            tables[i, : len(table)] = table
            width = max(width, len(table))
        num_seqs = len(chunks)
        if pad_seqs_to is not None and pad_seqs_to > num_seqs:
            assert num_decodes == num_seqs, "only all-decode batches are padded"
            pad = pad_seqs_to - num_seqs
            ids[t:t + pad] = 0
            pos[t:t + pad] = 0
            slots[t:t + pad] = 0  # block 0 (the null block), offset 0
            qsl[num_seqs + 1:pad_seqs_to + 1] = np.arange(t + 1, t + pad + 1, dtype=np.int32)
            seq_lens[num_seqs:pad_seqs_to] = 1
            ctx[num_seqs:pad_seqs_to] = 0
            tables[num_seqs:pad_seqs_to, 0] = 0
            num_seqs, t, num_decodes = pad_seqs_to, t + pad, pad_seqs_to
        assert t > 0, "a step needs at least one token"
        self._to_device(t, num_seqs, width)
        d = self.dev
        return AttentionMetadata(
            num_tokens=t, num_seqs=num_seqs, max_query_len=int(np.diff(qsl[: num_seqs + 1]).max()),
            max_seq_len=int(seq_lens[:num_seqs].max()), block_size=bs,
            query_start_loc=d["query_start_loc"][: num_seqs + 1], seq_lens=d["seq_lens"][:num_seqs],
            context_lens=d["context_lens"][:num_seqs], block_tables=d["block_tables"][:num_seqs],
            slot_mapping=d["slot_mapping"][:t], query_start_loc_cpu=qsl[: num_seqs + 1].tolist(),
            seq_lens_cpu=seq_lens[:num_seqs].tolist(), num_decode_seqs=num_decodes,
            decode_num_splits=decode_num_splits,
        )

    def load_dummy_decode(self, num_seqs: int, decode_num_splits: int) -> AttentionMetadata:
        """A decode batch of ``num_seqs`` dummy sequences (null block only): for warm-up and capture."""
        return self.load([], decode_num_splits, pad_seqs_to=num_seqs)

    def _to_device(self, num_tokens: int, num_seqs: int, width: int) -> None:
        if self.dev is self._host:
            return
        h, d = self._host, self.dev
        for key in ("input_ids", "positions", "slot_mapping"):
            d[key][:num_tokens].copy_(h[key][:num_tokens], non_blocking=True)
        d["query_start_loc"][: num_seqs + 1].copy_(h["query_start_loc"][: num_seqs + 1], non_blocking=True)
        for key in ("seq_lens", "context_lens"):
            d[key][:num_seqs].copy_(h[key][:num_seqs], non_blocking=True)
        d["block_tables"][:num_seqs, :width].copy_(h["block_tables"][:num_seqs, :width], non_blocking=True)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.dev["input_ids"]

    @property
    def positions(self) -> torch.Tensor:
        return self.dev["positions"]

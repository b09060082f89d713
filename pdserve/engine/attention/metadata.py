"""The per-step description of a packed batch that every attention backend reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's new tokens sit in the packed batch and where its KV lives.

    A step packs ``num_seqs`` sequences' new tokens back to back (``num_tokens`` rows). Sequence ``i``
    owns rows ``query_start_loc[i]:query_start_loc[i+1]``; before this step it had ``context_lens[i]``
    tokens of KV in the cache, after it ``seq_lens[i]``. ``block_tables[i, j]`` is the physical block
    holding its tokens ``j*block_size ... (j+1)*block_size-1``; ``slot_mapping[t]`` the flat cache slot
    (``block * block_size + offset``) that row ``t``'s new K/V is written to. Sequences with a single new
    token (decodes) come first: the first ``num_decode_seqs`` sequences own rows ``0 .. num_decode_seqs-1``. Host copies of the small
    per-sequence vectors are kept for code that must loop on the host (the torch reference).
    """

    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    num_decode_seqs: int = 0  # the first sequences of the batch that have exactly one new token
    decode_num_splits: int = 1  # KV splits of the decode kernel (fixed per CUDA graph)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

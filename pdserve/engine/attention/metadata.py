"""The per-step description of a packed batch that every attention backend reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LaunchShape:
    """The launch constants of one step's attention kernels: everything a CUDA graph freezes.

    ``num_tokens`` rows are run (the batch's tokens, then padding rows that write only the null block
    and whose outputs are discarded); the decode kernel's grid covers ``decode_capacity`` sequences
    with ``decode_programs`` (sequence, KV split) items per KV head, the prefill kernel runs
    ``prefill_programs`` persistent programs per head. The live counts and each step's split counts
    come from device memory (``AttentionMetadata.counts``), so a graph captured for one shape replays
    for every batch that fits it. A graph is captured without the split paths (``kv_split`` false:
    the launches of a step that splits nothing, as fast as before there were splits) and with them.
    """

    num_tokens: int
    decode_capacity: int
    decode_programs: int
    prefill_programs: int
    batch_specific: bool = False  # built for this very batch (an eager step): host facts may steer kernels
    kv_split: bool = False  # launches the KV-split paths too (only a step that splits needs them)


@dataclass
class AttentionMetadata:
    """Where each sequence's new tokens sit in the packed batch and where its KV lives.

    A step packs ``num_seqs`` sequences' new tokens back to back (``num_tokens`` rows). Sequence ``i``
    owns rows ``query_start_loc[i]:query_start_loc[i+1]``; before this step it had ``context_lens[i]``
    tokens of KV in the cache, after it ``seq_lens[i]``. ``block_tables[i, j]`` is the physical block
    holding its tokens ``j*block_size ... (j+1)*block_size-1``; ``slot_mapping[t]`` the flat cache slot
    (``block * block_size + offset``) that row ``t``'s new K/V is written to. Sequences with a single new
    token (decodes) come first: the first ``num_decode_seqs`` sequences own rows
    ``0 .. num_decode_seqs-1``. Host copies of the small per-sequence vectors are kept for code that
    must loop on the host (the torch reference).

    For the Triton kernels: ``counts`` is int32 ``[4]`` on the device (decode sequences, live query
    tiles, KV splits per decode, KV splits per query tile), ``query_tiles`` the prefill tile list (see
    ``kernels.paged_prefill``), ``launch`` the grid constants. ``launch.num_tokens`` may exceed
    ``num_tokens`` (padding for a CUDA graph).
    """

    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32 (at least 1 row: a CUDA graph captures the pointer)
    context_lens: torch.Tensor  # [num_seqs] int32 (likewise)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32 (likewise)
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    num_decode_seqs: int = 0  # the first sequences of the batch that have exactly one new token
    context_free_prefill: bool = False  # every prefill chunk starts at position 0 (no earlier KV)
    counts: torch.Tensor | None = None  # [4] int32: decode sequences, live query tiles, splits of each
    query_tiles: torch.Tensor | None = None  # [2, capacity] int32
    launch: LaunchShape | None = None
    decode_item_starts: torch.Tensor | None = None  # [>= num_decode_seqs + 1] int32: each decode's first split item
    decode_item_seq: torch.Tensor | None = None  # [>= items] int32: each split item's decode

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AttentionMetadata:
        """A copy whose every tensor field is ``fn`` of this one's (host lists and counts unchanged)."""
        mapped: dict[str, Any] = {f.name: fn(value) for f in dataclasses.fields(self)
                                  if isinstance(value := getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **mapped)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

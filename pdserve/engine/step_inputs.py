"""Persistent input buffers of the model runner: pinned host arrays mirrored by device tensors.

Every step writes its inputs into the host arrays (NumPy views of pinned memory), copies the used
prefix of each to the device asynchronously, and hands out views of the device tensors. The device
tensors never move, so CUDA graphs captured over them replay with each step's new values. On the CPU
the host arrays are the device tensors and nothing is copied.

Token-level int32 buffers: ``input_ids``, ``positions``, ``slot_mapping``; sequence-level:
``query_start_loc``, ``seq_lens``, ``context_lens``, ``block_tables`` ``[max_seqs, max_blocks]``;
launch data: ``counts`` (decode sequences, live query tiles, and the KV splits of each decode -- the
most of any -- and of each query tile, chosen per step by ``kv_splits``), the decodes' split items
(``decode_item_starts``, ``decode_item_seq``: see ``kernels.paged_decode.fill_split_items``) and
``query_tiles`` (see ``kernels.paged_prefill.build_query_tiles``).

A token sampled by the previous step may still be on the device only (asynchronous scheduling): its
row's input id is then copied on the device from that step's sampled ids (:class:`FedTokens`), so the
host never waits for it. For the same reason the host arrays are double-buffered: a step's copies may
still be queued behind the step in flight when the next step is written, so consecutive steps write
alternate pinned buffers, and a buffer is reused only once the copies that read it ran (an event).

With a tensor-parallel model captured in CUDA graphs, every rank past the first has a copy of the device
buffers on its own GPU (:mod:`pdserve.engine.rank_inputs`), written with the same copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pdserve.engine.attention.metadata import AttentionMetadata, LaunchShape
from pdserve.engine.kernels.paged_decode import MAX_SPLITS, fill_split_items
from pdserve.engine.kernels.paged_prefill import build_query_tiles
from pdserve.engine.rank_inputs import RankInputs
from pdserve.engine.step_plan import ScheduledChunk


@dataclass(frozen=True)
class StepCounts:
    """What a step's shape depends on, known once its chunks are laid out."""

    num_tokens: int
    num_decodes: int
    num_query_tiles: int
    max_seq_len: int
    max_decode_seq_len: int = 0
    max_chunk_seq_len: int = 0  # the longest context (its own tokens included) a prefill chunk attends to
    decode_seq_lens: np.ndarray | None = field(default=None, compare=False)  # each decode's (None: all the max)

    def decode_lens(self) -> np.ndarray:
        """Each decode's context, its own token included (the longest for all when not given)."""
        if self.decode_seq_lens is not None:
            return self.decode_seq_lens
        return np.full(self.num_decodes, self.max_decode_seq_len, dtype=np.int32)


#: Chooses a step's KV splits (of each decode: int32 ``[num_decodes]``; per query tile) from its counts and
#: launch shape.
ChooseKVSplits = Callable[[StepCounts, LaunchShape], tuple[np.ndarray, int]]


def no_kv_splits(counts: StepCounts, launch: LaunchShape) -> tuple[np.ndarray, int]:
    return np.ones(counts.num_decodes, dtype=np.int32), 1


@dataclass(frozen=True)
class FedTokens:
    """The previous step's sampled ids (device, int64 ``[rows]``) and the row of each request in it."""

    token_ids: torch.Tensor
    row_of: dict[str, int]


class StepInputs:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device, query_tile_rows: int | None = None,
                 kv_splits: ChooseKVSplits = no_kv_splits) -> None:
        self.device = device
        self.kv_splits = kv_splits
        self.split_item_table = False  # the decode kernels read each decode's split count from the item table
        self.block_size = block_size
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.query_tile_rows = query_tile_rows
        tile_capacity = (-(-max_tokens // query_tile_rows) + max_seqs) if query_tile_rows else 1
        pin = device.type == "cuda"
        shapes = {
            "input_ids": (max_tokens,), "positions": (max_tokens,), "slot_mapping": (max_tokens,),
            "query_start_loc": (max_seqs + 1,), "seq_lens": (max_seqs,), "context_lens": (max_seqs,),
            "block_tables": (max_seqs, max_blocks_per_seq), "counts": (4,), "query_tiles": (2, tile_capacity),
            "feed": (2, max_seqs), "decode_item_starts": (max_seqs + 1,), "decode_item_seq": (max_seqs * MAX_SPLITS,),
        }
        self._sets = [{k: torch.zeros(v, dtype=torch.int32, pin_memory=pin) for k, v in shapes.items()}
                      for _ in range(2 if pin else 1)]
        self._copied: list[list[torch.cuda.Event]] = [[] for _ in self._sets]
        self._turn = 0
        self.num_fed_rows = 0  # inputs taken on the device from the previous step's sampled ids (a metric)
        self.dev = ({k: torch.zeros(v, dtype=torch.int32, device=device) for k, v in shapes.items()}
                    if pin else self._sets[0])
        self._np_sets = [{k: t.numpy() for k, t in host.items()} for host in self._sets]
        self._host = self._sets[0]
        self.np = self._np_sets[0]
        self.ranks: list[RankInputs] = []  # copies on the GPUs of tensor-parallel ranks past the first

    def add_rank(self, device: torch.device) -> RankInputs:
        """Keep a copy of the device buffers on ``device`` (a tensor-parallel rank's GPU), written with every
        step's inputs from now on (see :mod:`pdserve.engine.rank_inputs`)."""
        rank = RankInputs(self.dev, device)
        self.ranks.append(rank)
        return rank

    def _next_host_set(self) -> None:
        """Switch to the other pinned buffer set, waiting (rarely) until copies out of it have run."""
        self._turn = (self._turn + 1) % len(self._sets)
        for event in self._copied[self._turn]:
            event.synchronize()
        self._host = self._sets[self._turn]
        self.np = self._np_sets[self._turn]

    def load(self, chunks: Sequence[ScheduledChunk], launch_for: Callable[[StepCounts], LaunchShape],
             fed: FedTokens | None = None) -> AttentionMetadata:
        """Write the chunks' inputs and return the step's metadata over device views.

        ``chunks`` must list single-token chunks (decodes) first. ``launch_for`` turns the step's counts
        into its launch shape (with the split paths, ``kv_split``, when ``kv_splits`` splits anything); rows past the batch up to ``launch.num_tokens`` are padding that reads
        token 0 at position 0 and writes only the null block (slot 0). A chunk whose last token is not
        yet known on the host (sampled by the step in flight) takes it from ``fed``.
        """
        self._next_host_set()
        bs = self.block_size
        n = self.np
        ids, pos, slots = n["input_ids"], n["positions"], n["slot_mapping"]
        qsl, seq_lens, ctx, tables = n["query_start_loc"], n["seq_lens"], n["context_lens"], n["block_tables"]
        feed_rows: list[int] = []
        feed_sources: list[int] = []
        t = 0
        qsl[0] = 0
        width = 1
        num_decodes = 0
        context_free = True
        for i, chunk in enumerate(chunks):
            start, count, table = chunk.start, chunk.num_tokens, chunk.block_ids
            end = start + count
            known = chunk.request.all_token_ids
            if end > len(known):
                assert fed is not None and end == len(known) + 1, "only a chunk's last token may be in flight"
                feed_rows.append(t + count - 1)
                feed_sources.append(fed.row_of[chunk.request.request_id])
            if count == 1:
                num_decodes += num_decodes == i
                ids[t] = known[start] if start < len(known) else 0
                pos[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                context_free = context_free and start == 0
                last = min(end, len(known))
                ids[t:t + last - start] = known[start:last]
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
        num_tiles = 0
        if self.query_tile_rows is not None and num_decodes < num_seqs:
            num_tiles = build_query_tiles(np.diff(qsl[num_decodes:num_seqs + 1]), num_decodes,
                                          self.query_tile_rows, n["query_tiles"])
        max_seq_len = int(seq_lens[:num_seqs].max()) if num_seqs else 0
        counts = StepCounts(t, num_decodes, num_tiles, max_seq_len,
                            max_decode_seq_len=int(seq_lens[:num_decodes].max()) if num_decodes else 0,
                            max_chunk_seq_len=int(seq_lens[num_decodes:num_seqs].max()) if num_decodes < num_seqs else 0,
                            decode_seq_lens=seq_lens[:num_decodes].copy())  # the host buffer is reused
        launch = launch_for(counts)
        decode_splits, prefill_splits = self.kv_splits(counts, launch)
        most = int(decode_splits.max()) if num_decodes else 1
        n["counts"][:] = (num_decodes, num_tiles, most, prefill_splits)
        if (most, prefill_splits) != (1, 1):
            launch = dataclasses.replace(launch, kv_split=True)
        num_items = 0
        if self.split_item_table and launch.kv_split:
            num_items = fill_split_items(decode_splits, n["decode_item_starts"], n["decode_item_seq"])
        else:
            assert (decode_splits == most).all(), "decodes split unequally need the item table"
        padded = launch.num_tokens
        assert padded >= t and (padded > 0), "a step needs at least one row"
        ids[t:padded] = 0
        pos[t:padded] = 0
        slots[t:padded] = 0  # block 0 (the null block), offset 0
        self._to_device(padded, num_seqs, width, num_tiles, num_decodes, num_items)
        if feed_rows:
            assert fed is not None
            self._feed(fed.token_ids, feed_rows, feed_sources)
            self.num_fed_rows += len(feed_rows)
        d = self.dev
        rows = max(num_seqs, 1)  # never an empty view: its data_ptr() is 0, which a captured graph would keep
        return AttentionMetadata(
            num_tokens=t, num_seqs=num_seqs,
            max_query_len=int(np.diff(qsl[: num_seqs + 1]).max()) if num_seqs else 0,
            max_seq_len=max_seq_len, block_size=bs,
            query_start_loc=d["query_start_loc"][: num_seqs + 1], seq_lens=d["seq_lens"][:rows],
            context_lens=d["context_lens"][:rows], block_tables=d["block_tables"][:rows],
            slot_mapping=d["slot_mapping"][:padded], query_start_loc_cpu=qsl[: num_seqs + 1].tolist(),
            seq_lens_cpu=seq_lens[:num_seqs].tolist(), num_decode_seqs=num_decodes,
            context_free_prefill=context_free and num_decodes < num_seqs, counts=d["counts"], query_tiles=d["query_tiles"], launch=launch,
            decode_item_starts=d["decode_item_starts"] if self.split_item_table else None,
            decode_item_seq=d["decode_item_seq"] if self.split_item_table else None,
        )

    def load_padding(self, launch: LaunchShape) -> AttentionMetadata:
        """A batch of padding rows only (no sequence): for warm-up and CUDA-graph capture."""
        return self.load([], lambda _: launch)

    def _feed(self, token_ids: torch.Tensor, rows: list[int], sources: list[int]) -> None:
        k = len(rows)
        self.np["feed"][0, :k] = rows
        self.np["feed"][1, :k] = sources
        feed = self.dev["feed"]
        if feed is not self._host["feed"]:
            feed[:, :k].copy_(self._host["feed"][:, :k], non_blocking=True)
            self._record_copies()
        index = feed[:, :k].long()
        picked = token_ids.index_select(0, index[1]).to(torch.int32)
        self.dev["input_ids"].index_copy_(0, index[0], picked)
        for rank in self.ranks:
            rank.feed(index[0], picked)

    def _record_copies(self) -> None:
        """Mark the copies out of the current host buffers: on this device's stream and every rank's."""
        events = []
        for device in [self.device] + [rank.device for rank in self.ranks]:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        self._copied[self._turn] = events

    def _to_device(self, num_tokens: int, num_seqs: int, width: int, num_tiles: int, num_decodes: int,
                   num_items: int) -> None:
        if self.dev is self._host:
            return
        h = self._host
        for d in [self.dev] + [rank.dev for rank in self.ranks]:
            for key in ("input_ids", "positions", "slot_mapping"):
                d[key][:num_tokens].copy_(h[key][:num_tokens], non_blocking=True)
            d["query_start_loc"][: num_seqs + 1].copy_(h["query_start_loc"][: num_seqs + 1], non_blocking=True)
            for key in ("seq_lens", "context_lens"):
                d[key][:num_seqs].copy_(h[key][:num_seqs], non_blocking=True)
            d["block_tables"][:num_seqs, :width].copy_(h["block_tables"][:num_seqs, :width], non_blocking=True)
            d["counts"].copy_(h["counts"], non_blocking=True)
            if num_tiles:
                d["query_tiles"][:, :num_tiles].copy_(h["query_tiles"][:, :num_tiles], non_blocking=True)
            if num_items:  # the decodes' split items (read by a launch with the split paths and the item table)
                d["decode_item_starts"][: num_decodes + 1].copy_(h["decode_item_starts"][: num_decodes + 1],
                                                                 non_blocking=True)
                d["decode_item_seq"][:num_items].copy_(h["decode_item_seq"][:num_items], non_blocking=True)
        self._record_copies()

    @property
    def input_ids(self) -> torch.Tensor:
        return self.dev["input_ids"]

    @property
    def positions(self) -> torch.Tensor:
        return self.dev["positions"]

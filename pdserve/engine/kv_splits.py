"""How many ways a step's attention splits each sequence's keys: the rule the runner applies to every
step, and the benchmark (``benchmarks.attention_splits``) times against no split.

The attention kernels read the split counts from device memory (``StepInputs`` writes them with the
step's other counts), so a step replaying a CUDA graph sized for its token count still gets the split
its own decodes and chunks need: a graph of 512 rows has room for 256 decodes, and the few long ones
of a step that also carries a prompt chunk would otherwise go to a handful of programs each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pdserve.common import switches
from pdserve.engine.attention.metadata import LaunchShape
from pdserve.engine.kernels.paged_decode import SPLIT_WAVES, balanced_split_counts, choose_num_splits
from pdserve.engine.step_inputs import StepCounts

#: Split each decode of a ragged step by its own context (``balanced_split_counts``) instead of every decode
#: alike: on by default (one H200, ShareGPT-like, workers set up for TPOT 10 ms: goodput 47.8 -> 69.3 and
#: 72 -> 72 req/s on seeds 8 and 9, TPOT p50 lower at 10 of 12 points; ``serve-g1t10bal*``, ``serve-g1t15bal*``);
#: ``PDSERVE_BALANCED_DECODE_SPLITS=0`` is the A/B switch back to one count for all.
BALANCED_DECODE_SPLITS = switches.BALANCED_DECODE_SPLITS.flag()

#: A step's decodes count as ragged, and (with ``balanced``) split each by its own context, when the longest
#: context is more than this many times the mean: a ShareGPT-like batch of 17-60 decodes (one or two long
#: conversations among short ones), whose one count for all ran 1.2-2.9x slower than per-sequence splits on an
#: H200 (``attention_splits-h200``). Batches of alike contexts keep the one count, which ran faster there (32
#: decodes of 2k: the balanced rule's three splits each, from the extra tile of each decode's own token, were
#: 9% slower than two).
RAGGED_CONTEXT_FACTOR = 2.0

#: The fewest keys (context plus the chunk's own) per KV split of a prefill query tile: below that the
#: partial results' round trip through memory costs more than the parallelism gains.
PREFILL_SPLIT_KEYS = 512


def graph_launch_shape(num_tokens: int, max_num_seqs: int, query_tile_rows: int | None, num_kv_heads: int,
                       num_sms: int) -> LaunchShape:
    """The launch shape of a CUDA graph for ``num_tokens`` padded tokens: room for as many decodes as the
    engine may run, and for a few of them split along the KV enough to fill the GPU twice
    (flash-decoding); enough persistent prefill programs for every tile of a few prompts in one wave,
    which also take the key splits of a few tiles over a long context (:class:`KVSplitRule`)."""
    capacity = min(num_tokens, max_num_seqs)
    programs = 0
    if query_tile_rows is not None:
        programs = min(-(-num_tokens // query_tile_rows) + 8, num_tokens // 2)
    return LaunchShape(num_tokens, capacity, decode_split_room(capacity, num_kv_heads, num_sms), programs)


def decode_split_room(capacity: int, num_kv_heads: int, num_sms: int) -> int:
    """(sequence, KV split) items per KV head a graph of ``capacity`` decodes needs so that every decode
    count it may carry gets the splits :func:`choose_num_splits` wants for a long context (on an H200, 66:
    three decodes split 22 ways); a graph with room for fewer items cuts the splits of its small batches."""
    return max((n * choose_num_splits(n, num_kv_heads, 1 << 30, num_sms) for n in range(1, capacity + 1)),
               default=0)


@dataclass(frozen=True)
class KVSplitRule:
    """The split counts of one engine's steps: its attention heads and KV heads (a rank's, under tensor
    parallelism) and the GPU's multiprocessors."""

    num_kv_heads: int
    num_sms: int
    num_heads: int
    balanced: bool = field(default_factory=lambda: BALANCED_DECODE_SPLITS)

    def decode_splits(self, num_decodes: int, max_seq_len: int) -> int:
        """Splits per decode for ``num_decodes`` decodes whose longest context is ``max_seq_len``:
        about two waves of the GPU, at least two key tiles a split."""
        return choose_num_splits(max(num_decodes, 1), self.num_kv_heads, max(max_seq_len, 1), self.num_sms)

    def decode_split_counts(self, counts: StepCounts, room: int) -> np.ndarray:
        """Splits of each decode of the step (int32 ``[num_decodes]``), their items within ``room`` per KV
        head: every decode alike (:meth:`decode_splits`), or with ``balanced`` and ragged contexts
        (:data:`RAGGED_CONTEXT_FACTOR`) each by its own context (``balanced_split_counts``, aiming at the same
        items per KV head)."""
        n = counts.num_decodes
        if not n:
            return np.ones(0, dtype=np.int32)
        if self.balanced:
            lens = counts.decode_lens()
            if float(lens.max()) > RAGGED_CONTEXT_FACTOR * float(lens.mean()):
                return balanced_split_counts(lens, SPLIT_WAVES * self.num_sms // self.num_kv_heads, room)
        return np.full(n, max(1, min(self.decode_splits(n, counts.max_decode_seq_len), room // n)), dtype=np.int32)

    def __call__(self, counts: StepCounts, launch: LaunchShape) -> tuple[np.ndarray, int]:
        """This step's KV splits of each decode and per prefill query tile, within the launch's items. A graph
        step's query tiles split only while their programs (tiles times heads) leave multiprocessors
        idle, up to one wave, with at least ``PREFILL_SPLIT_KEYS`` keys a split: a prefill program is
        large (one per multiprocessor), so splitting past a wave only adds waves and partial results
        (on an H200, one tile after 2-4k tokens of context: 1.7-1.9x faster at 4-9 splits; two tiles
        after 1k split five ways: 13% slower). An eager step has one program per tile (no split)."""
        decode = self.decode_split_counts(counts, launch.decode_programs)
        prefill = 1
        if counts.num_query_tiles and not launch.batch_specific:
            prefill = max(1, min(launch.prefill_programs // counts.num_query_tiles,
                                 self.num_sms // (counts.num_query_tiles * self.num_heads),
                                 counts.max_chunk_seq_len // PREFILL_SPLIT_KEYS))
        return decode, prefill

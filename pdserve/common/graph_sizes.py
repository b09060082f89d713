"""The padded step sizes of an engine's CUDA graphs, shared by the engine (which captures them) and the
planner's simulation (which fills a budget-cut prompt chunk up to them, as the engine's scheduler does).

A step of ``n`` tokens replays the smallest graph holding it (or a larger one that replays faster: the
engine measures that at start-up) and computes that graph's rows whatever it carries; past the largest
graph it runs eagerly and computes ``n`` rows. Pure: no torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def capture_sizes(max_num_seqs: int, max_tokens: int) -> list[int]:
    """Padded token counts to capture: every decode batch up to ``max_num_seqs`` is covered, and every
    step up to ``max_tokens`` tokens."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max(max_num_seqs, max_tokens)}
    ladder = [(256, 16), (512, 64), (1024, 128), (1 << 30, 256)]
    size, limit = 16, max(max_tokens, max_num_seqs)
    while size <= limit:
        sizes.add(size)
        size += next(step for bound, step in ladder if size < bound)
    sizes.update(s for s in (max_num_seqs, max_tokens) if 1 <= s <= limit)
    return sorted(sizes)


def padded_rows(graph_rows: Sequence[int], tokens: int) -> int:
    """Rows a step of ``tokens`` tokens computes, given the ascending distinct row counts its engine's
    graphs compute (``graph_rows``; empty: no graphs): the smallest that holds it, else ``tokens``."""
    i = bisect.bisect_left(graph_rows, tokens)
    return graph_rows[i] if i < len(graph_rows) else tokens

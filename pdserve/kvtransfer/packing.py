"""Packing a planned message's parts into its bytes (sender) and unpacking them into the cache (receiver).

A message's bytes are its parts' ``[2, n, block_size, heads, dim]`` payloads back to back
(:mod:`pdserve.kvtransfer.plan`), so, viewed as a run of blocks (:func:`message_blocks`), part ``k``'s
keys sit at blocks ``o_k .. o_k + n_k - 1`` and its values right after. Consecutive parts of one layer form
a :class:`LayerRun`; each run is packed or unpacked with one block-copy launch
(:func:`~pdserve.kvtransfer.messages.pack_layer_blocks`), whatever the number of its parts: a prefill step
sends each layer of all its prompts as one message, and one launch (and one index tensor) per prompt and
layer was the host cost that grew with the prompts of a step, on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pdserve.kvtransfer.base import KVLayoutInfo
from pdserve.kvtransfer.messages import pack_layer_blocks, unpack_layer_blocks
from pdserve.kvtransfer.plan import PlannedMessage

#: Block ids (or positions) as a device tensor: the caller memoises them (``index_tensor``).
IndexOf = Callable[[tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True)
class LayerRun:
    """Consecutive parts of a message of one layer. ``positions[i]`` are part ``parts[i]``'s blocks in
    the message: its keys' then its values'."""

    layer: int
    parts: tuple[int, ...]  # indices into the message's parts
    positions: tuple[tuple[int, ...], ...]


def layer_runs(message: PlannedMessage) -> list[LayerRun]:
    """``message``'s parts in runs of one layer, each part with its block positions in the message."""
    runs: list[LayerRun] = []
    offset = 0
    for i, part in enumerate(message.parts):
        positions = tuple(range(offset, offset + 2 * part.num_blocks))
        offset += 2 * part.num_blocks
        if runs and runs[-1].layer == part.layer:
            last = runs[-1]
            runs[-1] = LayerRun(last.layer, last.parts + (i,), last.positions + (positions,))
        else:
            runs.append(LayerRun(part.layer, (i,), (positions,)))
    return runs


def run_positions(positions: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The values of a ``[2, n]`` position tensor for the given parts, flattened: every part's key
    blocks, then every part's value blocks."""
    keys = [p for part in positions for p in part[:len(part) // 2]]
    values = [p for part in positions for p in part[len(part) // 2:]]
    return tuple(keys + values)


def message_blocks(buffer: torch.Tensor, layout: KVLayoutInfo) -> torch.Tensor:
    """A message's ``uint8`` buffer viewed as blocks ``[m, block_size, heads, dim]`` of the layout's dtype."""
    return buffer.view(layout.torch_dtype).view(-1, *layout.payload_shape(1)[2:])


def pack_message(message: PlannedMessage, sources: Sequence[tuple[torch.Tensor, Sequence[int]]],
                 buffer: torch.Tensor, layout: KVLayoutInfo, index_of: IndexOf) -> None:
    """Fill ``buffer`` (the message's bytes) from ``sources[k]`` = (cache layer, source block ids) of part
    ``k``: one launch per run of parts that read the same tensor."""
    blocks = message_blocks(buffer, layout)
    for run in layer_runs(message):
        for group in _split_where(run, lambda i, j: sources[i][0] is sources[j][0]):
            src = tuple(b for i, _ in group for b in sources[i][1])
            positions = index_of(run_positions([pos for _, pos in group])).view(2, -1)
            pack_layer_blocks(sources[group[0][0]][0], index_of(src), blocks, positions)


def unpack_message(message: PlannedMessage, targets: Sequence[Sequence[int] | None], buffer: torch.Tensor,
                   caches: Sequence[torch.Tensor], layout: KVLayoutInfo, index_of: IndexOf) -> None:
    """Write the received ``buffer`` into ``caches``: part ``k`` into blocks ``targets[k]`` of its layer,
    parts whose target is ``None`` (not claimed) skipped; one launch per run of one layer."""
    blocks = message_blocks(buffer, layout)
    for run in layer_runs(message):
        claimed = [(i, pos) for i, pos in zip(run.parts, run.positions) if targets[i] is not None]
        if not claimed:
            continue
        dst = tuple(b for i, _ in claimed for b in targets[i] or ())
        positions = index_of(run_positions([pos for _, pos in claimed])).view(2, -1)
        unpack_layer_blocks(blocks, positions, caches[run.layer], index_of(dst))


def _split_where(run: LayerRun, same: Callable[[int, int], bool]) -> list[list[tuple[int, tuple[int, ...]]]]:
    """A run's (part, positions) in groups of consecutive parts for which ``same(previous, next)`` holds
    (a sender's layer is one tensor, but nothing forces a caller to pass the same view twice)."""
    groups: list[list[tuple[int, tuple[int, ...]]]] = []
    for i, positions in zip(run.parts, run.positions):
        if groups and same(groups[-1][-1][0], i):
            groups[-1].append((i, positions))
        else:
            groups.append([(i, positions)])
    return groups

"""Packing a planned message's parts into its bytes (sender) and unpacking them into the cache (receiver).

A message's bytes are its parts' ``[2, n, block_size, heads, dim]`` payloads back to back
(:mod:`pdserve.kvtransfer.plan`), so, viewed as a run of blocks (:func:`message_blocks`), part ``k``'s
keys sit at blocks ``o_k .. o_k + n_k - 1`` and its values right after. Consecutive parts of one layer form
a :class:`LayerRun`; each run is packed or unpacked with one block-copy launch
(:func:`~pdserve.kvtransfer.messages.pack_layer_blocks`), whatever the number of its parts: a prefill step
sends each layer of all its prompts as one message, and one launch (and one index tensor) per prompt and
layer was the host cost that grew with the prompts of a step, on both sides. Host work stays
independent of the number of blocks where it can: a lone part goes through its own payload view (its
block ids are memoised per transfer), and a run's key/value positions, relative to the run, are
memoised by the parts' sizes (a step's layers share them) -- building them per block cost ~0.3 ms per
layer of a 16k-token prompt (measured: 0.65 -> 0.38 of raw NCCL at 16k tokens).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.kvtransfer.base import KVLayoutInfo
from pdserve.kvtransfer.messages import gather_blocks, pack_layer_blocks, scatter_blocks, unpack_layer_blocks
from pdserve.kvtransfer.plan import PlannedMessage
from pdserve.kvtransfer.streams import index_tensor


@dataclass(frozen=True)
class LayerRun:
    """Consecutive parts of a message of one layer: ``parts`` (indices into the message's parts) start at
    block ``start`` of the message; part ``parts[i]`` has ``sizes[i]`` blocks, its keys then its values."""

    layer: int
    start: int
    parts: tuple[int, ...]
    sizes: tuple[int, ...]

    def offsets(self) -> list[int]:
        """Each part's first block relative to the run's start."""
        return [2 * before for before in itertools.accumulate(self.sizes[:-1], initial=0)]


def layer_runs(message: PlannedMessage) -> list[LayerRun]:
    """``message``'s parts in runs of one layer."""
    runs: list[LayerRun] = []
    offset = 0
    for i, part in enumerate(message.parts):
        if runs and runs[-1].layer == part.layer:
            last = runs[-1]
            runs[-1] = LayerRun(last.layer, last.start, last.parts + (i,), last.sizes + (part.num_blocks,))
        else:
            runs.append(LayerRun(part.layer, offset, (i,), (part.num_blocks,)))
        offset += 2 * part.num_blocks
    return runs


def run_positions(parts: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """The values of a ``[2, n]`` position tensor, flattened, for parts given as (first block relative to
    the run, blocks): every part's key blocks, then every part's value blocks."""
    keys = [o + j for o, n in parts for j in range(n)]
    values = [o + n + j for o, n in parts for j in range(n)]
    return tuple(keys + values)


def message_blocks(buffer: torch.Tensor, layout: KVLayoutInfo) -> torch.Tensor:
    """A message's ``uint8`` buffer viewed as blocks ``[m, block_size, heads, dim]`` of the layout's dtype."""
    return buffer.view(layout.torch_dtype).view(-1, *layout.payload_shape(1)[2:])


def _positions(parts: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """The ``[2, n]`` positions of ``parts`` on ``device``, memoised by their short description (a step's
    layers share it), never rebuilt from a per-block key."""
    return index_tensor(functools.partial(run_positions, parts), device, key=("positions", parts)).view(2, -1)


def pack_message(message: PlannedMessage, sources: Sequence[tuple[torch.Tensor, Sequence[int]]],
                 buffer: torch.Tensor, layout: KVLayoutInfo) -> None:
    """Fill ``buffer`` (the message's bytes) from ``sources[k]`` = (cache layer, source block ids) of part
    ``k``: one launch per run of parts that read the same tensor."""
    blocks = message_blocks(buffer, layout)
    for run in layer_runs(message):
        offsets = run.offsets()
        # parts that read the same tensor (a sender's layer is one tensor, but nothing forces a caller to
        # pass the same view twice): groups of consecutive ones
        for _, grouped in itertools.groupby(range(len(run.parts)), key=lambda k: id(sources[run.parts[k]][0])):
            group = list(grouped)
            layer = sources[run.parts[group[0]]][0]
            base = run.start + offsets[group[0]]
            if len(group) == 1:
                ids = tuple(sources[run.parts[group[0]]][1])
                n = run.sizes[group[0]]
                gather_blocks(layer, index_tensor(ids, blocks.device), out=blocks[base:base + 2 * n].view(2, n, *blocks.shape[1:]))
                continue
            src = tuple(b for k in group for b in sources[run.parts[k]][1])
            parts = tuple((offsets[k] - offsets[group[0]], run.sizes[k]) for k in group)
            pack_layer_blocks(layer, index_tensor(src, blocks.device), blocks[base:], _positions(parts, blocks.device))


def unpack_message(message: PlannedMessage, targets: Sequence[Sequence[int] | None], buffer: torch.Tensor,
                   caches: Sequence[torch.Tensor], layout: KVLayoutInfo) -> None:
    """Write the received ``buffer`` into ``caches``: part ``k`` into blocks ``targets[k]`` of its layer,
    parts whose target is ``None`` (not claimed) skipped; one launch per run of one layer."""
    blocks = message_blocks(buffer, layout)
    for run in layer_runs(message):
        offsets = run.offsets()
        claimed = [k for k, i in enumerate(run.parts) if targets[i] is not None]
        if not claimed:
            continue
        if len(claimed) == 1:
            (k,) = claimed
            base, n = run.start + offsets[k], run.sizes[k]
            scatter_blocks(caches[run.layer], index_tensor(tuple(targets[run.parts[k]] or ()), blocks.device),
                           blocks[base:base + 2 * n].view(2, n, *blocks.shape[1:]))
            continue
        dst = tuple(b for k in claimed for b in targets[run.parts[k]] or ())
        parts = tuple((offsets[k], run.sizes[k]) for k in claimed)
        unpack_layer_blocks(blocks[run.start:], _positions(parts, blocks.device), caches[run.layer], index_tensor(dst, blocks.device))


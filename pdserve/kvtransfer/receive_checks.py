"""What a receiver checks before it writes a LAYER part or completes a transfer on FINISH.

Each check returns ``None`` when the message is acceptable, else a sentence saying what is wrong (the
transfer then FAILS with it; see :mod:`pdserve.kvtransfer.receiving`). Pure functions of the expected
transfer's state and the message, so every transport applies the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.kvtransfer.base import KVLayoutInfo
from pdserve.kvtransfer.messages import Header


def layer_header_problem(layout: KVLayoutInfo, num_expected_blocks: int, finish_seen: bool,
                         header: Header) -> str | None:
    """A LAYER part for a transfer of ``num_expected_blocks`` destination blocks: after FINISH, outside
    the model's layers or the expected blocks, or of the wrong size."""
    if finish_seen:
        return "a layer message arrived after the transfer's FINISH"
    if not 0 <= header.layer < layout.num_layers:
        return f"layer {header.layer} is out of range [0, {layout.num_layers})"
    if header.num_blocks <= 0 or header.start < 0 or header.start + header.num_blocks > num_expected_blocks:
        return (f"blocks [{header.start}, {header.start + header.num_blocks}) fall outside the "
                f"{num_expected_blocks} expected blocks")
    if header.payload_nbytes != layout.payload_nbytes(header.num_blocks):
        return (f"a layer message of {header.num_blocks} blocks has {header.payload_nbytes} bytes, expected "
                f"{layout.payload_nbytes(header.num_blocks)}")
    return None


def payload_problem(layout: KVLayoutInfo, device: torch.device, header: Header, payload: torch.Tensor) -> str | None:
    """A payload already in hand (``deliver_layer``): the layout's dtype, this receiver's device, and the
    shape of ``header.num_blocks`` blocks."""
    if payload.dtype != layout.torch_dtype or payload.device != device:
        return f"the payload is {payload.dtype} on {payload.device}, expected {layout.torch_dtype} on {device}"
    if tuple(payload.shape) != layout.payload_shape(header.num_blocks):
        return f"the payload has shape {tuple(payload.shape)}, expected {layout.payload_shape(header.num_blocks)}"
    return None


def range_problem(num_expected_blocks: int, header: Header) -> str | None:
    """A one-sided sender's FINISH: the block range it says it wrote lies within the expected blocks."""
    if not (0 <= header.start <= num_expected_blocks and 0 <= header.num_blocks <= num_expected_blocks):
        return f"the sender covered blocks [{header.start}, {header.num_blocks}) of {num_expected_blocks} expected"
    return None


def completion_problem(num_messages: int, coverage: Sequence[int], num_expected_blocks: int,
                       header: Header) -> str | None:
    """A FINISH (``start`` = blocks skipped, ``num_blocks`` = blocks covered, ``num_messages`` = LAYER parts
    sent): every announced part arrived and every layer covers every block index in ``[start, num_blocks)``
    (``coverage[layer]``: bit i set = block index i written)."""
    skip, covered = header.start, header.num_blocks
    if num_messages != header.num_messages:
        return f"the sender sent {header.num_messages} layer messages but {num_messages} arrived"
    if covered > num_expected_blocks:
        return f"the sender covered {covered} blocks, only {num_expected_blocks} were expected"
    needed = ((1 << covered) - 1) & ~((1 << skip) - 1)
    for layer, mask in enumerate(coverage):
        if mask & needed != needed:
            missing = [i for i in range(skip, covered) if not (mask >> i) & 1]
            return f"layer {layer} never received block indices {missing[:16]}"
    return None

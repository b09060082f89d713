"""The wire format of one sender -> receiver channel, and the block gather/scatter it carries.

Every message starts with a fixed header of ``HEADER_FIELDS`` little-endian int64 values; a ``FINISH``
header is followed by ``num_ints`` more int64 values (the completion payload). A ``LAYER`` or ``HELLO``
message is then followed, on the bulk channel, by exactly ``payload_nbytes`` bytes:

==============  =====================================================================================
field           meaning
==============  =====================================================================================
magic           ``MAGIC`` (rejects a stray or corrupt message)
version         ``PROTOCOL_VERSION``
kind            :class:`MessageKind`
transfer_id     the transfer (0 for channel messages: HELLO, CLOSE, STOP)
layer           LAYER: the layer index
start           LAYER: first block index (into the request's block list); FINISH: ``num_skip_blocks``
num_blocks      LAYER: blocks in the payload; FINISH: blocks the sender covered (largest ``end`` sent)
payload_nbytes  LAYER/HELLO: bytes of the payload that follows on the bulk channel
num_messages    FINISH: how many LAYER messages the sender sent for this transfer
num_ints        FINISH: how many completion-payload ints follow the header
==============  =====================================================================================

The process-group transport never sends LAYER headers on their own: a PLAN header announces a run of
bulk messages made of LAYER parts (see :mod:`pdserve.kvtransfer.plan`), and the receiver posts all of
their receives at once. LAYER headers remain the unit a receiver checks and lands.

A LAYER payload is the tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` of the cache's
dtype, gathered from the source blocks into one contiguous buffer and scattered into the destination
blocks (one block-copy kernel each on CUDA, ``index_select`` / ``index_copy_`` on CPU); it travels as
raw bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import torch

MAGIC = 0x50444B56  # "PDKV"
PROTOCOL_VERSION = 3
HEADER_FIELDS = 10
HEADER_NBYTES = 8 * HEADER_FIELDS
#: Upper bound on completion-payload ints (it carries a few token ids, not data).
MAX_PAYLOAD_INTS = 4096


class MessageKind(enum.IntEnum):
    """What a message means. HELLO warms the bulk channel up; CLOSE says the sender is going away;
    STOP is the receiver waking its own reader to shut down (never sent by a sender)."""

    HELLO = 1
    LAYER = 2
    FINISH = 3
    CANCEL = 4
    CLOSE = 5
    STOP = 6
    PLAN = 7


class ProtocolError(ValueError):
    """A message that does not follow this format (wrong magic or version, truncated)."""


@dataclass(frozen=True)
class Header:
    """One message header; ``ints`` is the FINISH completion payload (empty otherwise)."""

    kind: MessageKind
    transfer_id: int = 0
    layer: int = 0
    start: int = 0
    num_blocks: int = 0
    payload_nbytes: int = 0
    num_messages: int = 0
    ints: tuple[int, ...] = ()

    def pack(self) -> bytes:
        """The header as ``HEADER_FIELDS`` int64 values, then ``ints``."""
        values = (MAGIC, PROTOCOL_VERSION, int(self.kind), self.transfer_id, self.layer, self.start,
                  self.num_blocks, self.payload_nbytes, self.num_messages, len(self.ints), *self.ints)
        return struct.pack(f"<{len(values)}q", *values)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Parse :meth:`pack`'s output; raises :class:`ProtocolError` on anything else."""
        if len(data) < HEADER_NBYTES or len(data) % 8:
            raise ProtocolError(f"a message header has {len(data)} bytes, expected at least {HEADER_NBYTES}")
        values = struct.unpack(f"<{len(data) // 8}q", data)
        magic, version, kind, tid, layer, start, num_blocks, nbytes, num_messages, num_ints = \
            values[:HEADER_FIELDS]
        if magic != MAGIC:
            raise ProtocolError(f"bad message magic {magic:#x}")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"the peer speaks KV transfer protocol {version}, this worker "
                                f"{PROTOCOL_VERSION}")
        if num_ints != len(values) - HEADER_FIELDS:
            raise ProtocolError(f"header announces {num_ints} ints, carries {len(values) - HEADER_FIELDS}")
        try:
            message_kind = MessageKind(kind)
        except ValueError:
            raise ProtocolError(f"unknown message kind {kind}") from None
        return cls(message_kind, tid, layer, start, num_blocks, nbytes, num_messages,
                   tuple(values[HEADER_FIELDS:]))


def check_payload_ints(payload: object) -> tuple[int, ...]:
    """The completion payload as a tuple of int64-range ints, or ``ValueError``."""
    if isinstance(payload, (str, bytes)) or not hasattr(payload, "__iter__"):
        raise ValueError(f"payload must be a sequence of ints, got {payload!r}")
    ints = tuple(payload)
    if len(ints) > MAX_PAYLOAD_INTS:
        raise ValueError(f"payload has {len(ints)} ints, at most {MAX_PAYLOAD_INTS} are allowed")
    for v in ints:
        if isinstance(v, bool) or not isinstance(v, int) or not -(2 ** 63) <= v < 2 ** 63:
            raise ValueError(f"payload values must be int64 ints, got {v!r}")
    return ints


def gather_blocks(kv_layer: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks ``index`` of one layer as a contiguous ``[2, n, block_size, heads, dim]`` tensor (``out``,
    or a new one). On CUDA one block-copy kernel: ``index_select`` along dim 1 moved 4 GB of 64 KiB
    blocks at ~1 TB/s on an H200, and competed with NCCL for the memory that long."""
    if out is None:
        out = kv_layer.new_empty((2, index.numel(), *kv_layer.shape[2:]))
    if kv_layer.is_cuda:
        from pdserve.kvtransfer.block_copy import copy_blocks  # triton: imported on CUDA hosts only

        copy_blocks(kv_layer, out, index, torch.arange(index.numel(), device=index.device))
    else:
        torch.index_select(kv_layer, 1, index, out=out)
    return out


def scatter_blocks(kv_layer: torch.Tensor, index: torch.Tensor, payload: torch.Tensor) -> None:
    """Write ``payload`` (``[2, n, ...]``, contiguous) into blocks ``index`` of one layer, in place."""
    if kv_layer.is_cuda and payload.is_contiguous():
        from pdserve.kvtransfer.block_copy import copy_blocks

        copy_blocks(payload, kv_layer, torch.arange(index.numel(), device=index.device), index)
    else:
        kv_layer.index_copy_(1, index, payload)


def pack_layer_blocks(kv_layer: torch.Tensor, src_ids: torch.Tensor, blocks: torch.Tensor,
                      positions: torch.Tensor) -> None:
    """``blocks[positions[kv, i]] = kv_layer[kv, src_ids[i]]`` (kv = 0, 1): blocks of one layer into a
    message viewed as ``[m, block_size, heads, dim]`` (:func:`~pdserve.kvtransfer.packing.message_blocks`);
    ``positions`` is ``[2, n]``. On CUDA one block-copy launch for all ``n`` blocks."""
    _check_positions(kv_layer, blocks, src_ids, positions)
    if kv_layer.is_cuda and kv_layer.stride(-1) == 1:  # a layer or a view of some heads
        from pdserve.kvtransfer.block_copy import gather_into_message

        gather_into_message(kv_layer, src_ids, blocks, positions)
        return
    for kv in (0, 1):
        blocks[positions[kv]] = kv_layer[kv].index_select(0, src_ids)


def unpack_layer_blocks(blocks: torch.Tensor, positions: torch.Tensor, kv_layer: torch.Tensor,
                        dst_ids: torch.Tensor) -> None:
    """``kv_layer[kv, dst_ids[i]] = blocks[positions[kv, i]]``: the inverse of :func:`pack_layer_blocks`."""
    _check_positions(kv_layer, blocks, dst_ids, positions)
    if kv_layer.is_cuda and kv_layer.stride(-1) == 1:  # a layer or a view of some heads
        from pdserve.kvtransfer.block_copy import scatter_from_message

        scatter_from_message(blocks, positions, kv_layer, dst_ids)
        return
    for kv in (0, 1):
        kv_layer[kv].index_copy_(0, dst_ids, blocks[positions[kv]])


def _check_positions(kv_layer: torch.Tensor, blocks: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> None:
    if kv_layer.shape[0] != 2 or blocks.shape[1:] != kv_layer.shape[2:] or blocks.dtype != kv_layer.dtype:
        raise ValueError(f"cannot move blocks between a {tuple(kv_layer.shape)} {kv_layer.dtype} layer and a "
                         f"message of {tuple(blocks.shape)} {blocks.dtype}")
    if ids.dim() != 1 or positions.shape != (2, ids.numel()) or not positions.is_contiguous():
        raise ValueError(f"positions must be a contiguous [2, {ids.numel()}] tensor for {ids.numel()} block ids, "
                         f"not {tuple(positions.shape)}")


def warm_up_block_copies(kv_layer: torch.Tensor) -> None:
    """Compile the block-copy kernel's variants of this layout now (a transfer's first message would wait
    ~1 s each): one block gathered into, and scattered within, a scratch tensor, and packed into and
    unpacked from a scratch message; the cache is only read."""
    if kv_layer.is_cuda:
        one = torch.zeros(1, dtype=torch.long, device=kv_layer.device)
        scratch = kv_layer.new_empty((2, 1, *kv_layer.shape[2:]))
        scatter_blocks(scratch, one, gather_blocks(kv_layer, one))
        blocks = kv_layer.new_empty((2, *kv_layer.shape[2:]))
        positions = torch.tensor([[0], [1]], dtype=torch.long, device=kv_layer.device)
        pack_layer_blocks(kv_layer, one, blocks, positions)
        unpack_layer_blocks(blocks, positions, scratch, one)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor (what the bulk channel carries)."""
    return tensor.reshape(-1).view(torch.uint8)

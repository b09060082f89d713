"""Copy KV blocks of one layer from one paged cache into another, possibly on a peer GPU.

``copy_blocks(src_layer, dst_layer, src_ids, dst_ids)`` writes ``src_layer[:, src_ids[i]]`` into
``dst_layer[:, dst_ids[i]]`` for every ``i`` (keys and values). On CUDA it is one Triton kernel launched
on the *current* device and stream, reading ``src_layer`` (which must live on that device) and storing
into ``dst_layer`` wherever that lives: for the CUDA IPC transport it is the decode worker's cache,
mapped into this process, and the stores travel over NVLink as peer writes. No host synchronisation,
no staging buffer, and no work on the peer GPU's SMs. On CPU (tests) it is ``index_copy_``.

Both tensors have the KV layout ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (contiguous),
with possibly different ``num_blocks``; ``src_ids``/``dst_ids`` are int64 tensors on the current
device. ``copy_blocks_reference`` is the torch definition the kernel is tested against.

The same kernel packs and unpacks the process-group transports' messages (:func:`gather_into_message`,
:func:`scatter_from_message`): a message's bytes are its parts' ``[2, n, ...]`` payloads back to back,
so keys and values of a part sit at different *positions* of one flat run of blocks; with a ``[2, n]``
position tensor (row 0: where each block's keys go, row 1: its values) one launch moves every part of a
message that reads one layer, instead of one launch (and an index tensor) per part.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements one program copies (a 16-token block of 8 heads x 128 dims has 16384 per K or V).
CHUNK_ELEMS = 4096


@triton.jit(do_not_specialize=["src_ids_kv_stride", "dst_ids_kv_stride"])  # one compile for every n
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, src_kv_stride, dst_kv_stride,
                        src_ids_kv_stride, dst_ids_kv_stride, BLOCK_ELEMS: tl.constexpr, CHUNK: tl.constexpr):
    i = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    src_block = tl.load(src_ids_ptr + kv * src_ids_kv_stride + i).to(tl.int64)
    dst_block = tl.load(dst_ids_ptr + kv * dst_ids_kv_stride + i).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < BLOCK_ELEMS
    values = tl.load(src_ptr + kv * src_kv_stride + src_block * BLOCK_ELEMS + offs, mask=mask)
    tl.store(dst_ptr + kv * dst_kv_stride + dst_block * BLOCK_ELEMS + offs, values, mask=mask)


def copy_blocks(src_layer: torch.Tensor, dst_layer: torch.Tensor, src_ids: torch.Tensor,
                dst_ids: torch.Tensor) -> None:
    """Copy blocks ``src_ids`` of ``src_layer`` into blocks ``dst_ids`` of ``dst_layer`` (see module).

    On CUDA the kernel runs on ``src_layer``'s device, which must be current; ``dst_layer`` may be a
    peer device's memory that this device can access (peer access enabled). Returns at once.
    """
    if src_layer.shape[0] != 2 or src_layer.shape[2:] != dst_layer.shape[2:] or src_layer.dtype != dst_layer.dtype:
        raise ValueError(f"cannot copy blocks of {tuple(src_layer.shape)} {src_layer.dtype} into "
                         f"{tuple(dst_layer.shape)} {dst_layer.dtype}")
    if src_ids.numel() != dst_ids.numel():
        raise ValueError(f"{src_ids.numel()} source blocks but {dst_ids.numel()} destination blocks")
    if src_ids.numel() == 0:
        return
    if src_layer.device.type != "cuda":
        copy_blocks_reference(src_layer, dst_layer, src_ids, dst_ids)
        return
    _launch(src_layer, dst_layer, src_ids, dst_ids, src_layer.stride(0), dst_layer.stride(0), 0, 0)


def gather_into_message(kv_layer: torch.Tensor, src_ids: torch.Tensor, blocks: torch.Tensor,
                        positions: torch.Tensor) -> None:
    """``blocks[positions[kv, i]] = kv_layer[kv, src_ids[i]]`` for keys and values (kv = 0, 1), in one
    launch on the current device: pack blocks of one layer into a message viewed as ``[m, block_size,
    heads, dim]``; ``positions`` is a contiguous ``[2, n]`` int64 tensor (checked by the caller,
    :func:`pdserve.kvtransfer.messages.pack_layer_blocks`)."""
    _launch(kv_layer, blocks, src_ids, positions, kv_layer.stride(0), 0, 0, positions.stride(0))


def scatter_from_message(blocks: torch.Tensor, positions: torch.Tensor, kv_layer: torch.Tensor,
                         dst_ids: torch.Tensor) -> None:
    """``kv_layer[kv, dst_ids[i]] = blocks[positions[kv, i]]``: the inverse of :func:`gather_into_message`."""
    _launch(blocks, kv_layer, positions, dst_ids, 0, kv_layer.stride(0), positions.stride(0), 0)


def _launch(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor, src_kv_stride: int,
            dst_kv_stride: int, src_ids_kv_stride: int, dst_ids_kv_stride: int) -> None:
    """One kernel: for i < n and kv in (0, 1), block ``src_ids[kv * src_ids_kv_stride + i]`` of ``src``
    (offset ``kv * src_kv_stride``) to block ``dst_ids[kv * dst_ids_kv_stride + i]`` of ``dst``."""
    n = dst_ids.shape[-1]
    if n == 0:
        return
    block_elems = dst[0, 0].numel() if dst_kv_stride else dst[0].numel()
    chunk = min(CHUNK_ELEMS, triton.next_power_of_2(block_elems))
    grid = (n, 2, triton.cdiv(block_elems, chunk))
    _copy_blocks_kernel[grid](src, dst, src_ids, dst_ids, src_kv_stride, dst_kv_stride, src_ids_kv_stride,
                              dst_ids_kv_stride, BLOCK_ELEMS=block_elems, CHUNK=chunk, num_warps=4)


def copy_blocks_reference(src_layer: torch.Tensor, dst_layer: torch.Tensor, src_ids: torch.Tensor,
                          dst_ids: torch.Tensor) -> None:
    """The torch definition of :func:`copy_blocks` (both tensors on one device)."""
    dst_layer.index_copy_(1, dst_ids, src_layer.index_select(1, src_ids))

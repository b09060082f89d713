"""Copy KV blocks of one layer from one paged cache into another, possibly on a peer GPU.

``copy_blocks(src_layer, dst_layer, src_ids, dst_ids)`` writes ``src_layer[:, src_ids[i]]`` into
``dst_layer[:, dst_ids[i]]`` for every ``i`` (keys and values). On CUDA it is one Triton kernel launched
on the *current* device and stream, reading ``src_layer`` (on that device, or on a peer GPU of this
process: a tensor-parallel worker's other ranks) and storing into ``dst_layer`` wherever that lives: for the CUDA IPC transport it is the decode worker's cache,
mapped into this process, and the stores travel over NVLink as peer writes. No host synchronisation,
no staging buffer, and no work on the peer GPU's SMs. On CPU (tests) it is ``index_copy_``.

Both tensors have the KV layout ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, with possibly
different ``num_blocks``: whole layers, or views of consecutive heads of a wider layer (KV moved between
tensor-parallel degrees; any strides as long as ``head_dim`` is contiguous). ``src_ids``/``dst_ids``
are int64 tensors on the current device. ``copy_blocks_reference`` is the torch definition the kernel is
tested against.

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
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
                        src_kv_stride, src_block_stride, src_token_stride, src_head_stride,
                        dst_kv_stride, dst_block_stride, dst_token_stride, dst_head_stride,
                        src_ids_kv_stride, dst_ids_kv_stride,
                        HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_ELEMS: tl.constexpr, CHUNK: tl.constexpr):
    i = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    src_block = tl.load(src_ids_ptr + kv * src_ids_kv_stride + i).to(tl.int64)
    dst_block = tl.load(dst_ids_ptr + kv * dst_ids_kv_stride + i).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < BLOCK_ELEMS
    token = offs // (HEADS * DIM)  # (token, head, dim) of each element: strides per view, dims contiguous
    head = (offs // DIM) % HEADS
    dim = offs % DIM
    src = src_ptr + kv * src_kv_stride + src_block * src_block_stride + token * src_token_stride + head * src_head_stride
    dst = dst_ptr + kv * dst_kv_stride + dst_block * dst_block_stride + token * dst_token_stride + head * dst_head_stride
    tl.store(dst + dim, tl.load(src + dim, mask=mask), mask=mask)


def copy_blocks(src_layer: torch.Tensor, dst_layer: torch.Tensor, src_ids: torch.Tensor,
                dst_ids: torch.Tensor) -> None:
    """Copy blocks ``src_ids`` of ``src_layer`` into blocks ``dst_ids`` of ``dst_layer`` (see module).

    On CUDA the kernel runs on the current device, which must be able to read ``src_layer`` (its own
    memory, or a peer GPU's of this process with peer access enabled) and to write ``dst_layer`` (its
    own, or a peer's, e.g. mapped over CUDA IPC). Returns at once.
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
    _launch(src_layer, dst_layer, src_ids, dst_ids, 0, 0)


def gather_into_message(kv_layer: torch.Tensor, src_ids: torch.Tensor, blocks: torch.Tensor,
                        positions: torch.Tensor) -> None:
    """``blocks[positions[kv, i]] = kv_layer[kv, src_ids[i]]`` for keys and values (kv = 0, 1), in one
    launch on the current device: pack blocks of one layer into a message viewed as ``[m, block_size,
    heads, dim]``; ``positions`` is a contiguous ``[2, n]`` int64 tensor (checked by the caller,
    :func:`pdserve.kvtransfer.messages.pack_layer_blocks`)."""
    _launch(kv_layer, blocks.unsqueeze(0), src_ids, positions, 0, positions.stride(0))


def scatter_from_message(blocks: torch.Tensor, positions: torch.Tensor, kv_layer: torch.Tensor,
                         dst_ids: torch.Tensor) -> None:
    """``kv_layer[kv, dst_ids[i]] = blocks[positions[kv, i]]``: the inverse of :func:`gather_into_message`."""
    _launch(blocks.unsqueeze(0), kv_layer, positions, dst_ids, positions.stride(0), 0)


def block_strides(layer: torch.Tensor) -> tuple[int, int, int, int]:
    """``(kv, block, token, head)`` element strides of a ``[2 or 1, blocks, block_size, heads, dim]`` tensor
    whose ``dim`` is contiguous (a whole layer, a view of some of its heads, or a message as ``[1, m, ...]``;
    a size-1 kv dimension gets stride 0, so keys and values address the same blocks through the ids)."""
    if layer.dim() != 5 or layer.stride(4) != 1:
        raise ValueError(f"the block copy needs [2, blocks, block_size, heads, dim] with contiguous dims, got "
                         f"shape {tuple(layer.shape)} strides {layer.stride()}")
    kv = layer.stride(0) if layer.shape[0] == 2 else 0
    return kv, layer.stride(1), layer.stride(2), layer.stride(3)


def _launch(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor,
            src_ids_kv_stride: int, dst_ids_kv_stride: int) -> None:
    """One kernel: for i < n and kv in (0, 1), block ``src_ids[kv * src_ids_kv_stride + i]`` of ``src`` to
    block ``dst_ids[kv * dst_ids_kv_stride + i]`` of ``dst`` (both ``[2 or 1, blocks, bs, heads, dim]``)."""
    n = dst_ids.shape[-1]
    if n == 0:
        return
    _, _, block_size, heads, dim = dst.shape
    block_elems = block_size * heads * dim
    chunk = min(CHUNK_ELEMS, triton.next_power_of_2(block_elems))
    grid = (n, 2, triton.cdiv(block_elems, chunk))
    _copy_blocks_kernel[grid](src, dst, src_ids, dst_ids, *block_strides(src), *block_strides(dst),
                              src_ids_kv_stride, dst_ids_kv_stride, HEADS=heads, DIM=dim, BLOCK_ELEMS=block_elems,
                              CHUNK=chunk, num_warps=4)


def copy_blocks_reference(src_layer: torch.Tensor, dst_layer: torch.Tensor, src_ids: torch.Tensor,
                          dst_ids: torch.Tensor) -> None:
    """The torch definition of :func:`copy_blocks` (both tensors on one device)."""
    dst_layer.index_copy_(1, dst_ids, src_layer.index_select(1, src_ids))

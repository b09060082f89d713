"""One-shot all-reduce of a small tensor between GPUs that map each other's memory (NVLink peers).

Every rank launches the same kernel on its own stream with the same grid. Program ``p`` of rank ``r``:

1. copies its slice of the rank's tensor into rank ``r``'s staging buffer (half ``epoch % 2``),
2. signals every peer (a release store of ``epoch`` into the peer's flag slot ``[r, p]``, system scope)
   and waits until every peer's program ``p`` signalled the same epoch into its own slots (acquire),
3. sums its slice over every rank's staging buffer, in rank order (so every rank gets the same bits),
   and writes the sum over its tensor.

``epoch`` counts the calls of program ``p`` (a per-program counter in device memory, so CUDA graph
replays advance it): both ranks make the same calls with the same grid, so program ``p`` of every rank
is at the same epoch. Why two halves suffice: a rank can write half ``e % 2`` again only at epoch
``e + 2``, whose kernel starts after its epoch ``e + 1`` kernel passed its wait, which needed every
peer's epoch ``e + 1`` signals, sent after those peers' epoch ``e`` kernels ended (stream order).
A peer may signal ``e + 1`` before a slow rank saw ``e``, hence "at least ``epoch``", and int64 counters.

Contract: :func:`load_kernels` ran on every rank's GPU before the first call; every rank calls with
tensors of the same shape and dtype, the same :class:`Grid`, and the same sequence of calls;
a rank that never comes leaves the others spinning on the device (as a NCCL collective would).

:func:`peer_all_reduce_rmsnorm` is the same exchange fused with what follows every all-reduce of a
decoder layer: the residual add and the RMSNorm (program ``p`` owns whole rows, so it can normalise
them); it shares the buffers, flags and epochs, so the two kernels may be called in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdserve.engine.kernels.rmsnorm import norm_warps


@dataclass(frozen=True)
class Grid:
    """Programs per call and elements a program moves per iteration. Every call of one grid uses the
    same program count, so every program's epoch counts every call (see module); each grid has buffers,
    flags and epochs of its own (:class:`~pdserve.engine.peer_all_reduce.PeerAllReduce`)."""

    programs: int
    block: int


#: 64 programs ran 8 KiB as fast as 8-16 and 1 MiB 2.8x faster than 16 on one H200
#: (``benchmarks/results/runs/peer_all_reduce_programs-h200.md``): decode steps' all-reduces.
SMALL = Grid(64, 1024)
#: More programs moving more per iteration for large tensors (a prefill step's all-reduces), where the same
#: sweep had 132 x 2048 fastest at 1 MiB: two programs per SM of an H200, still all resident at once.
WIDE = Grid(264, 2048)
#: Tensors above this many bytes go through :data:`WIDE`.
WIDE_FROM_BYTES = 1 << 20


@triton.jit
def _signal_and_wait(flag_table, rank, pid, epoch, WORLD: tl.constexpr, PROGRAMS_: tl.constexpr):
    """Release this program's staging writes to every peer and wait until every peer's program ``pid``
    released its own at ``epoch`` (or later)."""
    tl.debug_barrier()  # every thread's slice is written before the signal below releases it
    for peer in tl.static_range(WORLD):
        if peer != rank:
            peer_flags = tl.load(flag_table + peer).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(peer_flags + rank * PROGRAMS_ + pid, epoch, sem="release", scope="sys")
    own_flags = tl.load(flag_table + rank).to(tl.pointer_type(tl.int64)) + pid
    for peer in tl.static_range(WORLD):
        if peer != rank:
            slot = own_flags + peer * PROGRAMS_
            seen = tl.atomic_add(slot, 0, sem="acquire", scope="sys")
            while seen < epoch:
                seen = tl.atomic_add(slot, 0, sem="acquire", scope="sys")
    tl.debug_barrier()  # no thread reads a peer's slice before the wait above saw its signal


@triton.jit
def _epoch_and_half(counter_ptr, pid, half_elements):
    """This call's epoch for program ``pid`` and the offset of the staging half it uses."""
    epoch = tl.load(counter_ptr + pid) + 1
    return epoch, (epoch % 2) * half_elements


@triton.jit
def _staged_sum(stage_table, half, offsets, mask, dtype: tl.constexpr, WORLD: tl.constexpr, SIZE: tl.constexpr):
    """Every rank's staged elements at ``offsets``, summed in rank order in float32."""
    total = tl.zeros([SIZE], dtype=tl.float32)
    for source in tl.static_range(WORLD):
        stage = tl.load(stage_table + source).to(tl.pointer_type(dtype)) + half
        total += tl.load(stage + offsets, mask=mask, other=0.0, volatile=True).to(tl.float32)
    return total


@triton.jit
def _exchange(data_ptr, stage_table, flag_table, counter_ptr, n, half_elements, rank,
              WORLD: tl.constexpr, PROGRAMS_: tl.constexpr, BLOCK_: tl.constexpr):
    pid = tl.program_id(0)
    dtype = data_ptr.dtype.element_ty
    epoch, half = _epoch_and_half(counter_ptr, pid, half_elements)
    own_stage = tl.load(stage_table + rank).to(tl.pointer_type(dtype)) + half
    for start in range(pid * BLOCK_, n, PROGRAMS_ * BLOCK_):
        offsets = start + tl.arange(0, BLOCK_)
        mask = offsets < n
        tl.store(own_stage + offsets, tl.load(data_ptr + offsets, mask=mask), mask=mask)
    _signal_and_wait(flag_table, rank, pid, epoch, WORLD, PROGRAMS_)
    for start in range(pid * BLOCK_, n, PROGRAMS_ * BLOCK_):
        offsets = start + tl.arange(0, BLOCK_)
        mask = offsets < n
        total = _staged_sum(stage_table, half, offsets, mask, dtype, WORLD, BLOCK_)
        tl.store(data_ptr + offsets, total.to(dtype), mask=mask)
    tl.store(counter_ptr + pid, epoch)


@triton.jit(do_not_specialize=["data_ptr", "n", "half_elements", "rank", "exchange"])
def _peer_all_reduce_kernel(data_ptr, stage_table, flag_table, counter_ptr, n, half_elements, rank, exchange,
                            WORLD: tl.constexpr, PROGRAMS_: tl.constexpr, BLOCK_: tl.constexpr):
    if exchange != 0:  # 0: a warm-up launch (see :func:`load_kernels`), which touches nothing
        _exchange(data_ptr, stage_table, flag_table, counter_ptr, n, half_elements, rank, WORLD, PROGRAMS_, BLOCK_)


def peer_all_reduce(tensor: torch.Tensor, rank: int, world: int, stage_table: torch.Tensor, flag_table: torch.Tensor,
                    counters: torch.Tensor, half_elements: int, grid: Grid = SMALL) -> None:
    """Sum ``tensor`` (contiguous, on rank ``rank``'s GPU) over the ranks, in place, on the current stream.

    ``stage_table``/``flag_table``: int64 device pointers (on this rank's GPU), one per rank, of each
    rank's staging buffer for ``grid`` (two halves of ``half_elements`` of ``tensor``'s dtype) and flag
    slots (``world * grid.programs`` int64, zeroed once); ``counters``: this rank's ``grid.programs`` epochs.
    """
    n = tensor.numel()
    if n > half_elements:
        raise ValueError(f"{n} elements exceed the staging half of {half_elements}")
    _peer_all_reduce_kernel[(grid.programs,)](tensor, stage_table, flag_table, counters, n, half_elements, rank, 1,
                                              WORLD=world, PROGRAMS_=grid.programs, BLOCK_=grid.block, num_warps=4)


@triton.jit(do_not_specialize=["data_ptr", "residual_ptr", "rows", "half_elements", "rank", "exchange"])
def _peer_all_reduce_rmsnorm_kernel(data_ptr, residual_ptr, weight_ptr, stage_table, flag_table, counter_ptr, rows,
                                    half_elements, rank, eps, exchange, HIDDEN: tl.constexpr, ROW_BLOCK: tl.constexpr,
                                    WORLD: tl.constexpr, PROGRAMS_: tl.constexpr):
    if exchange != 0:  # 0: a warm-up launch, which touches nothing
        pid = tl.program_id(0)
        dtype = data_ptr.dtype.element_ty
        epoch, half = _epoch_and_half(counter_ptr, pid, half_elements)
        own_stage = tl.load(stage_table + rank).to(tl.pointer_type(dtype)) + half
        cols = tl.arange(0, ROW_BLOCK)
        mask = cols < HIDDEN
        for row in range(pid, rows, PROGRAMS_):  # program p owns rows p, p + PROGRAMS, ... on every rank
            offsets = row * HIDDEN + cols  # (int32: rows * HIDDEN fits a staging half)
            tl.store(own_stage + offsets, tl.load(data_ptr + offsets, mask=mask), mask=mask)
        _signal_and_wait(flag_table, rank, pid, epoch, WORLD, PROGRAMS_)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        for row in range(pid, rows, PROGRAMS_):
            offsets = row * HIDDEN + cols  # (int32: rows * HIDDEN fits a staging half)
            total = _staged_sum(stage_table, half, offsets, mask, dtype, WORLD, ROW_BLOCK)
            # the rounding steps of an all-reduce followed by the fused residual-add RMSNorm kernel
            residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
            x = (total.to(dtype).to(tl.float32) + residual.to(tl.float32)).to(dtype)
            tl.store(residual_ptr + offsets, x, mask=mask)
            xf = x.to(tl.float32)
            inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
            normed = (xf * inv_rms).to(dtype).to(tl.float32)
            tl.store(data_ptr + offsets, (normed * weight).to(dtype), mask=mask)
        tl.store(counter_ptr + pid, epoch)


def peer_all_reduce_rmsnorm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, rank: int,
                            world: int, stage_table: torch.Tensor, flag_table: torch.Tensor, counters: torch.Tensor,
                            half_elements: int) -> None:
    """In one kernel: sum ``partial`` (``[rows, hidden]``, contiguous) over the ranks, add ``residual``
    and RMS-normalise each row with ``weight``; in place: ``residual`` becomes the sum plus the residual
    (the next residual stream), ``partial`` its normalised rows. Bits as :func:`peer_all_reduce` then
    :func:`~pdserve.engine.kernels.rmsnorm.fused_rmsnorm`. Buffers as for :func:`peer_all_reduce`; the
    kernel for ``hidden`` must have been loaded (:func:`load_kernels`)."""
    rows, hidden = partial.shape
    if rows * hidden > half_elements:
        raise ValueError(f"{rows * hidden} elements exceed the staging half of {half_elements}")
    _peer_all_reduce_rmsnorm_kernel[(SMALL.programs,)](
        partial, residual, weight, stage_table, flag_table, counters, rows, half_elements, rank, eps, 1,
        HIDDEN=hidden, ROW_BLOCK=triton.next_power_of_2(hidden), WORLD=world, PROGRAMS_=SMALL.programs,
        num_warps=norm_warps(hidden))


def load_kernels(device: torch.device, world: int, dtypes: tuple[torch.dtype, ...],
                 norm_widths: tuple[int, ...] = (), grids: tuple[Grid, ...] = (SMALL,)) -> None:
    """Compile and load the kernels for every dtype and grid (and the fused norm's, on :data:`SMALL`, for
    every row width in ``norm_widths``) on ``device``, with launches that touch nothing.

    Call before any rank's first all-reduce: loading a kernel waits for the GPU's running kernels, so a
    rank loading its kernel while another rank's kernel on the same GPU spins for its signal would never
    return (seen with both ranks on one GPU). One binary serves every rank, size and alignment.
    """
    scratch = torch.zeros(max(grid.programs for grid in grids), dtype=torch.int64, device=device)
    for dtype in dtypes:
        data = torch.zeros(1, dtype=dtype, device=device)
        for grid in grids:
            _peer_all_reduce_kernel[(grid.programs,)](data, scratch, scratch, scratch, 0, 0, 0, 0, WORLD=world,
                                                      PROGRAMS_=grid.programs, BLOCK_=grid.block, num_warps=4)
        for hidden in norm_widths:
            _peer_all_reduce_rmsnorm_kernel[(SMALL.programs,)](
                data, data, data, scratch, scratch, scratch, 0, 0, 0, 1e-6, 0, HIDDEN=hidden,
                ROW_BLOCK=triton.next_power_of_2(hidden), WORLD=world, PROGRAMS_=SMALL.programs,
                num_warps=norm_warps(hidden))
    torch.cuda.synchronize(device)

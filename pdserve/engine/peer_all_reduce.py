"""The buffers of the one-shot peer all-reduce (:mod:`pdserve.engine.kernels.peer_all_reduce`) for
tensor-parallel ranks that are threads of one process, each on its own GPU.

An NCCL all-reduce of a decode step's few kilobytes costs ~15 us on 2xH200 (65 of them were a quarter
of a TP=2 decode step); here each rank's kernel reads the peers' staging buffers directly over NVLink,
and no rank meets the others on the host. Tensors up to the configured size take it (1 MiB and less
on a grid of few programs, larger ones, such as a prefill step's, on a wide grid); larger tensors stay
with NCCL (:meth:`PeerAllReduce.fits`).

Lifecycle: built once with the engine's ranks (:meth:`PeerAllReduce.build`, which enables peer access
between every pair of GPUs, or returns ``None`` when some pair cannot map each other's memory); rank
``r``'s thread then calls :meth:`all_reduce` with its own tensors only, on its current stream (eagerly
or while capturing a CUDA graph). The buffers live as long as the object.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pdserve.kvtransfer.streams import enable_peer_access

if TYPE_CHECKING:
    from pdserve.engine.kernels.peer_all_reduce import Grid

logger = logging.getLogger(__name__)

#: Element types the kernel sums (in float32).
SUMMED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class _GridBuffers:
    """One grid's staging buffers (two halves of ``half_bytes``), flag slots and epoch counters on every
    rank, and the device pointer tables the kernels read (see :mod:`pdserve.engine.kernels.peer_all_reduce`)."""

    def __init__(self, devices: list[torch.device], grid: Grid, half_bytes: int) -> None:
        world = len(devices)
        self.grid = grid
        self.half_bytes = half_bytes
        self.stages = [torch.empty(2 * half_bytes, dtype=torch.uint8, device=d) for d in devices]
        self.flags = [torch.zeros(world * grid.programs, dtype=torch.int64, device=d) for d in devices]
        self.counters = [torch.zeros(grid.programs, dtype=torch.int64, device=d) for d in devices]
        stage_pointers = [stage.data_ptr() for stage in self.stages]
        flag_pointers = [flags.data_ptr() for flags in self.flags]
        self.stage_tables = [torch.tensor(stage_pointers, dtype=torch.int64, device=d) for d in devices]
        self.flag_tables = [torch.tensor(flag_pointers, dtype=torch.int64, device=d) for d in devices]


class PeerAllReduce:
    """Staging buffers, flags and epoch counters of every rank (see module): for tensors up to 1 MiB on the
    small grid, larger ones (when ``max_bytes`` allows them) on the wide grid, each grid with buffers of its
    own (a rank may start a call of one grid while a peer still reads its staging for the other)."""

    def __init__(self, devices: list[torch.device], max_bytes: int, norm_widths: tuple[int, ...] = ()) -> None:
        from pdserve.engine.kernels.peer_all_reduce import SMALL, WIDE, WIDE_FROM_BYTES, load_kernels

        if max_bytes < 4:
            raise ValueError(f"a peer all-reduce needs at least 4 bytes of staging, got {max_bytes}")
        self.devices = devices
        self.max_bytes = max_bytes
        self.norm_widths = norm_widths
        self._small = _GridBuffers(devices, SMALL, min(max_bytes, WIDE_FROM_BYTES))
        self._wide = _GridBuffers(devices, WIDE, max_bytes) if max_bytes > WIDE_FROM_BYTES else None
        grids = (SMALL,) if self._wide is None else (SMALL, WIDE)
        for device in dict.fromkeys(devices):
            with torch.cuda.device(device):
                load_kernels(device, len(devices), SUMMED_DTYPES, norm_widths, grids)

    @classmethod
    def build(cls, devices: list[torch.device], max_bytes: int, norm_widths: tuple[int, ...] = ()
              ) -> PeerAllReduce | None:
        """The buffers for ranks on ``devices`` (CUDA), with peer access enabled between every pair of
        distinct GPUs; ``None`` (NCCL for every size) when ``max_bytes`` is 0 or some pair cannot.
        ``norm_widths``: the row widths the fused all-reduce + RMSNorm serves (the model's hidden size)."""
        if max_bytes <= 0:
            return None
        if not enable_peer_access(devices):
            logger.warning("some pair of GPUs %s cannot map each other's memory: every all-reduce goes through NCCL",
                           [str(device) for device in devices])
            return None
        return cls(devices, max_bytes, norm_widths)

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` goes through the peer kernel (small, contiguous, a summed dtype)."""
        return (tensor.dtype in SUMMED_DTYPES and tensor.is_contiguous()
                and tensor.numel() * tensor.element_size() <= self.max_bytes)

    def all_reduce(self, rank: int, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` (rank ``rank``'s, on its GPU; :meth:`fits`) over the ranks, in place."""
        from pdserve.engine.kernels.peer_all_reduce import peer_all_reduce

        nbytes = tensor.numel() * tensor.element_size()
        grid = self._small if nbytes <= self._small.half_bytes or self._wide is None else self._wide
        peer_all_reduce(tensor, rank, len(self.devices), grid.stage_tables[rank], grid.flag_tables[rank],
                        grid.counters[rank], grid.half_bytes // tensor.element_size(), grid.grid)

    def fits_rows(self, partial: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether the fused all-reduce + residual add + RMSNorm serves these rows (:meth:`fits` the small
        grid, 2-D, a width loaded at build, the residual alike)."""
        return (partial.dim() == 2 and partial.shape[1] in self.norm_widths and self.fits(partial)
                and partial.numel() * partial.element_size() <= self._small.half_bytes
                and residual.shape == partial.shape and residual.dtype == partial.dtype and residual.is_contiguous())

    def all_reduce_rmsnorm(self, rank: int, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> None:
        """Sum ``partial`` over the ranks, add it to ``residual`` and RMS-normalise, in place
        (:meth:`fits_rows`): ``residual`` becomes the sum, ``partial`` the normalised rows."""
        from pdserve.engine.kernels.peer_all_reduce import peer_all_reduce_rmsnorm

        grid = self._small
        peer_all_reduce_rmsnorm(partial, residual, weight, eps, rank, len(self.devices), grid.stage_tables[rank],
                                grid.flag_tables[rank], grid.counters[rank], grid.half_bytes // partial.element_size())

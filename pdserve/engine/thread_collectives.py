"""All-reduce between tensor-parallel ranks that are threads of one process, each on its own GPU.

torch's NCCL process groups assume one rank per process (two of them driven from two threads of one
process hung at start-up on 2xH200). Here the ranks meet on the host instead: each rank's thread
deposits its tensor and the stream it computes on, the last to arrive launches one NCCL all-reduce over
every rank's tensor (``torch.cuda.nccl.all_reduce``: one communicator clique for the process, one group
launch), and all ranks leave once it is enqueued. Nothing waits for the device: each rank's stream runs
the all-reduce kernel in order with its own work, and NCCL synchronises the GPUs. With a
:class:`~pdserve.engine.peer_all_reduce.PeerAllReduce`, tensors that fit it skip the host meeting: each
rank launches the one-shot kernel on its own, and the kernels meet on the devices.

Lifecycle: one :class:`ThreadRendezvous` per tensor-parallel engine; :meth:`ThreadRendezvous.group`
gives rank r the object its :class:`~pdserve.engine.model.parallel.TensorParallel` calls
``allreduce([tensor]).wait()`` on (the process-group interface). ``abort()`` breaks the barrier, so a
rank that died cannot leave the others waiting forever.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pdserve.engine.peer_all_reduce import PeerAllReduce

#: How long a rank waits for the others at one all-reduce before the step fails (a rank that died).
BARRIER_TIMEOUT_S = 300.0


class _Done:
    def wait(self, *_: Any) -> bool:
        return True


class ThreadRendezvous:
    def __init__(self, size: int, peer: PeerAllReduce | None = None) -> None:
        self.size = size
        self.peer = peer
        self._slots: list[tuple[torch.Tensor, torch.cuda.Stream] | None] = [None] * size
        self._barrier = threading.Barrier(size, action=self._launch, timeout=BARRIER_TIMEOUT_S)

    def group(self, rank: int) -> _RankGroup:
        return _RankGroup(self, rank)

    def all_reduce(self, rank: int, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks in place: through the peer kernel when it fits, else NCCL."""
        if self.peer is not None and self.peer.fits(tensor):
            self.peer.all_reduce(rank, tensor)
        else:
            self.nccl_all_reduce(rank, tensor)

    def all_reduce_rmsnorm(self, rank: int, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> bool:
        """The peer kernel's fused all-reduce + residual add + RMSNorm, in place, when these rows fit it;
        ``False`` (nothing done) otherwise: every rank decides alike, from the shapes."""
        if self.peer is None or not self.peer.fits_rows(partial, residual):
            return False
        self.peer.all_reduce_rmsnorm(rank, partial, residual, weight, eps)
        return True

    def nccl_all_reduce(self, rank: int, tensor: torch.Tensor) -> None:
        self._slots[rank] = (tensor, torch.cuda.current_stream(tensor.device))
        self._barrier.wait()  # the last rank to arrive runs _launch before any leaves

    def _launch(self) -> None:
        slots = [slot for slot in self._slots if slot is not None]
        assert len(slots) == self.size, "a rank reached the all-reduce without its tensor"
        torch.cuda.nccl.all_reduce([tensor for tensor, _ in slots], streams=[stream for _, stream in slots])
        self._slots = [None] * self.size

    def abort(self) -> None:
        self._barrier.abort()


class _RankGroup:
    """Rank ``rank``'s face of the rendezvous, shaped like a process group for ``all_reduce``."""

    def __init__(self, rendezvous: ThreadRendezvous, rank: int) -> None:
        self._rendezvous = rendezvous
        self._rank = rank

    def allreduce(self, tensors: list[torch.Tensor]) -> _Done:
        for tensor in tensors:
            self._rendezvous.all_reduce(self._rank, tensor)
        return _Done()

    def allreduce_rmsnorm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> bool:
        return self._rendezvous.all_reduce_rmsnorm(self._rank, partial, residual, weight, eps)

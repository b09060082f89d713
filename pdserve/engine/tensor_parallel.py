"""A model split over tensor-parallel ranks inside one engine process: one thread per rank past the first.

Rank 0 is the engine's own model: the scheduler, the KV block manager, the runner's step inputs and
the sampler exist once, and every rank reads the same step inputs (block ids mean the same blocks on
every rank; each rank's KV cache holds its own heads). A forward pass starts every other rank on its
thread with the same inputs, runs rank 0 on the caller's thread, and returns rank 0's hidden states
once all finished launching; the ranks meet in the all-reduces of their row-parallel projections
(:mod:`pdserve.engine.model.parallel`): over gloo on the CPU, over NCCL on GPUs (rank r on its own GPU;
the ranks meet on the host and one of them launches the all-reduce for all:
:mod:`pdserve.engine.thread_collectives`). The embedding and the LM head are split by vocabulary;
``compute_logits`` runs on every rank the same way, each computing its share, gathered on all of them;
sampling runs on rank 0.

On GPUs a rank past the first copies the step's inputs from rank 0's GPU to its own, on a stream that
first waits for an event rank 0 recorded after writing them (peer copies, NVLink); nothing waits on the
host. The all-reduces order the rest: rank 0 cannot pass its first all-reduce of a step before every
rank reached it, that is before every rank's input copy ran, so rank 0 may rewrite its input buffers
for the next step afterwards.

Lifecycle: ``TensorParallelModel.build(make, devices)`` forms the groups (every rank joins at once, each
on its own thread; on GPUs a first all-reduce checks them) and builds each rank's share of the weights on
its device; ``attach_kv_caches(layout, rank0)`` gives ranks past the first their caches once the engine
sized rank 0's (and, with ``detach_kv_caches()``, temporary ones for the sizing step); ``close()`` stops the threads.

KV transfer: the per-layer hook (KV streaming) is called for every rank's cache of the layer, indexed
layer-major, and :meth:`transfer_caches` lists the caches the same way; with workers of different
degrees both sides further cut each cache into views of consecutive KV heads
(``LLMEngine.transfer_caches(head_groups)``), so rank r's heads land in whichever decode rank owns them.

CUDA graphs (:meth:`capture_graph`): every rank captures its own graph of the forward pass on its own
GPU, at once, each on its thread; the all-reduces are captured into every rank's graph by the one NCCL
group launch that also serves eager steps (as NCCL's own tests capture one graph per GPU of a
single-process group). A rank past the first reads its inputs from its own copy of the step-input
buffers (:mod:`pdserve.engine.rank_inputs`), so a replay is one graph launch per rank from the engine's
thread, in rank order, with no thread hand-off: rank r's graph runs on the engine thread's current
stream of GPU r, after the copies of its inputs on that stream, and the ranks meet in the graphs'
all-reduce kernels. The logits (few kernels) still run eagerly on every rank's thread.

On GPUs the ranks' caches sit on different devices; the KV transports move them (CUDA IPC writes each
layer from the GPU it is mapped for; NCCL gathers and scatters the other ranks' blocks through rank 0's
GPU: :mod:`pdserve.kvtransfer`).
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from pdserve.engine.attention.metadata import AttentionMetadata
from pdserve.engine.device import on_device
from pdserve.engine.kv_cache.tensors import KVCacheLayout, allocate_kv_caches
from pdserve.engine.model.decoder import DecoderForCausalLM
from pdserve.engine.model.hf_config import ModelSpec
from pdserve.engine.model.parallel import TensorParallel
from pdserve.engine.peer_all_reduce import PeerAllReduce
from pdserve.engine.thread_collectives import BARRIER_TIMEOUT_S, ThreadRendezvous

GROUP_TIMEOUT = datetime.timedelta(seconds=300)


class TensorParallelModel:
    """Rank 0's model, to the runner; ranks past the first follow it (see module)."""

    def __init__(self, ranks: list[DecoderForCausalLM], devices: list[torch.device]) -> None:
        self.ranks = ranks
        self.devices = devices
        self.kv_caches: list[list[torch.Tensor]] = [[] for _ in ranks]
        self._pool = ThreadPoolExecutor(max(1, len(ranks) - 1), thread_name_prefix="pdserve-tp")
        self._rendezvous: ThreadRendezvous | None = None
        self._capture_streams: dict[int, torch.cuda.Stream] = {}

    @classmethod
    def build(cls, make: Callable[[TensorParallel], DecoderForCausalLM], devices: list[torch.device],
              peer_all_reduce_max_bytes: int = 0, norm_widths: tuple[int, ...] = ()) -> TensorParallelModel:
        """Form the ranks' groups (gloo on an in-process store; on GPUs a host rendezvous launching NCCL,
        and the one-shot peer kernel for all-reduces up to ``peer_all_reduce_max_bytes``, fused with the
        RMSNorm that follows for rows of ``norm_widths``) and ``make`` each rank's share of the model."""
        size = len(devices)
        rendezvous = None
        if devices[0].type == "cuda":
            rendezvous = ThreadRendezvous(size, PeerAllReduce.build(devices, peer_all_reduce_max_bytes, norm_widths))
        store = dist.HashStore()  # (gloo's; in-process, nothing to set up)

        def join(rank: int) -> Any:  # a gloo group's constructor returns once every rank joined
            if rendezvous is None:
                return dist.ProcessGroupGloo(store, rank, size, GROUP_TIMEOUT)
            with on_device(devices[rank]):
                probe = torch.ones(1, device=devices[rank])
                rendezvous.nccl_all_reduce(rank, probe)  # every rank here: NCCL's clique forms now
                _check_probe(rank, "NCCL", probe, size)
                if rendezvous.peer is not None:
                    probe = torch.ones(1, device=devices[rank])
                    rendezvous.peer.all_reduce(rank, probe)
                    _check_probe(rank, "the peer kernel", probe, size)
                return rendezvous.group(rank)

        with ThreadPoolExecutor(size) as pool:
            groups = list(pool.map(join, range(size)))
        model = cls([make(TensorParallel(rank, size, group)) for rank, group in enumerate(groups)], devices)
        model._rendezvous = rendezvous
        return model

    def attach_kv_caches(self, layout: KVCacheLayout, rank0: list[torch.Tensor]) -> None:
        """Caches for every rank past the first, shaped like rank 0's (``rank0``), each on its device."""
        self.kv_caches = [rank0] + [allocate_kv_caches(layout, device) for device in self.devices[1:]]

    def detach_kv_caches(self) -> None:
        """Drop every rank's caches (the engine's start-up sizing runs one step into temporary ones)."""
        self.kv_caches = [[] for _ in self.ranks]

    @property
    def spec(self) -> ModelSpec:
        """A rank's shape (every rank has the same)."""
        return self.ranks[0].spec

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits, on rank 0's device: every rank computes its vocabulary rows from a copy of
        rank 0's ``hidden`` (the LM head is split by vocabulary, :mod:`pdserve.engine.model.parallel`)."""
        return self._on_every_rank(lambda rank, device: self.ranks[rank].compute_logits(hidden.to(device)))

    def __getattr__(self, name: str) -> Any:  # full_spec, named_parameters ...: rank 0's (benchmarks, tests)
        return getattr(self.ranks[0], name)

    @property
    def layer_hook(self) -> Callable[[int, torch.Tensor], None] | None:
        return self.ranks[0].layer_hook

    @layer_hook.setter
    def layer_hook(self, hook: Callable[[int, torch.Tensor], None] | None) -> None:
        """``hook(index, cache)`` for every rank's cache of each layer, once rank 0 finished the layer
        (the layer's last all-reduce waited for every rank, so their KV is written); ``index`` counts
        layer-major over the ranks, as :meth:`transfer_caches` lists the caches."""
        if hook is None:
            self.ranks[0].layer_hook = None
            return
        size = len(self.ranks)

        def every_rank(layer: int, _rank0_cache: torch.Tensor) -> None:
            for rank in range(size):
                hook(layer * size + rank, self.kv_caches[rank][layer])

        self.ranks[0].layer_hook = every_rank

    def transfer_caches(self) -> list[torch.Tensor]:
        """Every rank's cache of every layer, layer-major (what a KV transfer between workers of the
        same tensor-parallel size moves: rank r's heads land in rank r's cache)."""
        return [cache for layer in zip(*self.kv_caches, strict=True) for cache in layer]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 metadata: AttentionMetadata) -> torch.Tensor:
        def forward(rank: int, device: torch.device) -> torch.Tensor:
            if rank == 0:
                return self.ranks[0](input_ids, positions, kv_caches, metadata)
            return self.ranks[rank](input_ids.to(device), positions.to(device), self.kv_caches[rank],
                                    metadata_on(metadata, device))

        return self._on_every_rank(forward)

    def _on_every_rank(self, work: Callable[[int, torch.device], torch.Tensor]) -> torch.Tensor:
        """Run ``work(rank, device)`` for every rank at once (ranks past the first on their threads, after
        rank 0's stream reached this point, so their copies from rank 0's GPU read finished inputs) and
        return rank 0's result once every rank finished launching. A rank that fails aborts the
        rendezvous, so the others leave their all-reduce instead of waiting."""
        inputs_ready = None
        if self.devices[0].type == "cuda":
            inputs_ready = torch.cuda.Event()
            inputs_ready.record(torch.cuda.current_stream(self.devices[0]))
        others = [self._pool.submit(self._run_rank, rank, work, inputs_ready) for rank in range(1, len(self.ranks))]
        try:
            return work(0, self.devices[0])
        except BaseException:
            if self._rendezvous is not None:
                self._rendezvous.abort()
            raise
        finally:
            for future in others:
                future.result()

    def _run_rank(self, rank: int, work: Callable[[int, torch.device], torch.Tensor],
                  inputs_ready: torch.cuda.Event | None) -> None:
        device = self.devices[rank]
        try:
            with torch.inference_mode(), on_device(device):
                if inputs_ready is not None:  # the peer copies run on this thread's stream of rank 0's GPU
                    torch.cuda.current_stream(self.devices[0]).wait_event(inputs_ready)
                work(rank, device)
        except BaseException:
            if self._rendezvous is not None:
                self._rendezvous.abort()
            raise

    def capture_graph(self, inputs: list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
                      pools: list[Any]) -> TensorParallelGraph:
        """Capture one forward pass per rank into a CUDA graph on its GPU, all ranks at once; ``inputs[r]``
        are rank r's (input ids, positions, metadata) over buffers that stay put (rank 0's step inputs,
        the others' copies), ``pools[r]`` the graph memory pool on rank r's GPU. Each rank first runs the
        pass eagerly on its capture stream (kernels built for its device, cuBLAS set up for the stream)."""
        graphs = [torch.cuda.CUDAGraph() for _ in self.ranks]
        outputs: list[torch.Tensor | None] = [None] * len(self.ranks)
        ready = threading.Barrier(len(self.ranks), timeout=BARRIER_TIMEOUT_S)  # all warmed up, none capturing

        def capture(rank: int, device: torch.device) -> torch.Tensor:
            ids, positions, metadata = inputs[rank]
            model, caches = self.ranks[rank], self.kv_caches[rank]
            if rank not in self._capture_streams:
                self._capture_streams[rank] = torch.cuda.Stream(device)
            stream = self._capture_streams[rank]
            stream.wait_stream(torch.cuda.current_stream(device))
            try:
                with torch.cuda.stream(stream):
                    model(ids, positions, caches, metadata)
                    stream.synchronize()
                    ready.wait()
                    graphs[rank].capture_begin(pool=pools[rank], capture_error_mode="thread_local")
                    try:
                        outputs[rank] = model(ids, positions, caches, metadata)
                    finally:
                        graphs[rank].capture_end()
            except BaseException:
                ready.abort()
                raise
            torch.cuda.current_stream(device).wait_stream(stream)
            return outputs[rank]  # type: ignore[return-value]

        output = self._on_every_rank(capture)
        return TensorParallelGraph(graphs, output)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class TensorParallelGraph:
    """One captured step: a CUDA graph per rank (see :meth:`TensorParallelModel.capture_graph`)."""

    def __init__(self, graphs: list[torch.cuda.CUDAGraph], output: torch.Tensor) -> None:
        self._graphs = graphs
        self.output = output

    def replay(self) -> torch.Tensor:
        """Launch every rank's graph (inputs already written) and return rank 0's hidden states."""
        for graph in self._graphs:
            graph.replay()
        return self.output


def _check_probe(rank: int, path: str, probe: torch.Tensor, size: int) -> None:
    if probe.item() != size:
        raise RuntimeError(f"tensor-parallel rank {rank}: a first all-reduce through {path} gave {probe.item()}, "
                           f"not {size}")


def metadata_on(metadata: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """``metadata`` with its tensors on ``device`` (itself when they are there already)."""
    if metadata.query_start_loc.device == device:
        return metadata
    return metadata.map_tensors(lambda tensor: tensor.to(device))

"""All-reduce latency between tensor-parallel ranks on threads of one process: NCCL (one group launch
for all ranks, as the engine's :class:`~pdserve.engine.thread_collectives.ThreadRendezvous` does) against
the one-shot peer kernel (:mod:`pdserve.engine.peer_all_reduce`), by message size.

    python -m benchmarks.all_reduce            # two GPUs: both paths; one GPU: the peer kernel only,
                                               # both ranks on it (its floor, no NVLink)

Each rank captures a CUDA graph of ``--calls`` back-to-back all-reduces of one tensor (as a decode step
captures its 65), the graphs are replayed together, and the time per all-reduce is the wall time of
``--replays`` replays on every rank over the calls. Every result is checked against the expected sum.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import torch

from benchmarks.common import markdown_table, run_info, write_results
from pdserve.engine.peer_all_reduce import PeerAllReduce
from pdserve.engine.thread_collectives import ThreadRendezvous

SIZES_KIB = (8, 64, 256, 512, 1024, 4096)


def time_path(devices: list[torch.device], peer: PeerAllReduce | None, size_bytes: int, calls: int,
              replays: int) -> float:
    """Microseconds per all-reduce of ``size_bytes`` of bf16 (NCCL when ``peer`` is None)."""
    world = len(devices)
    rendezvous = ThreadRendezvous(world, peer)
    numel = size_bytes // 2
    ready = threading.Barrier(world, timeout=120)
    graphs: list[torch.cuda.CUDAGraph | None] = [None] * world
    tensors: list[torch.Tensor | None] = [None] * world
    streams = [torch.cuda.Stream(device) for device in devices]
    errors: list[BaseException] = []

    def reduce_all(rank: int, tensor: torch.Tensor) -> None:
        for _ in range(calls):
            tensor.fill_(1.0)
            rendezvous.all_reduce(rank, tensor)

    def capture(rank: int) -> None:
        try:
            with torch.cuda.device(devices[rank]), torch.cuda.stream(streams[rank]):
                tensor = torch.empty(numel, dtype=torch.bfloat16, device=devices[rank])
                ready.wait()  # (ranks sharing a GPU: no allocation while a peer kernel spins)
                reduce_all(rank, tensor)  # warm-up: NCCL's clique formed
                streams[rank].synchronize()
                ready.wait()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    reduce_all(rank, tensor)
                finally:
                    graph.capture_end()
                graphs[rank], tensors[rank] = graph, tensor
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            errors.append(exc)
            ready.abort()
            rendezvous.abort()

    threads = [threading.Thread(target=capture, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]

    def replay_all() -> None:
        for rank, graph in enumerate(graphs):
            with torch.cuda.device(devices[rank]), torch.cuda.stream(streams[rank]):
                graph.replay()  # type: ignore[union-attr]
        for stream in streams:
            stream.synchronize()

    replay_all()
    start = time.perf_counter()
    for _ in range(replays):
        replay_all()
    elapsed = time.perf_counter() - start
    for tensor in tensors:
        assert tensor is not None and bool((tensor == world).all()), "an all-reduce summed wrong"
    return elapsed / (replays * calls) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--sizes-kib", default=",".join(map(str, SIZES_KIB)))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    gpus = torch.cuda.device_count()
    devices = [torch.device("cuda", rank % gpus) for rank in range(2)]
    info = run_info()
    rows: list[dict[str, Any]] = []
    for kib in (int(k) for k in args.sizes_kib.split(",")):
        row: dict[str, Any] = {"size_kib": kib}
        peer = PeerAllReduce.build(devices, kib * 1024)
        row["peer_us"] = round(time_path(devices, peer, kib * 1024, args.calls, args.replays), 2)
        if gpus >= 2:
            row["nccl_us"] = round(time_path(devices, None, kib * 1024, args.calls, args.replays), 2)
            row["peer_over_nccl"] = round(row["peer_us"] / row["nccl_us"], 3)
        print(row, flush=True)
        rows.append(row)
    where = "cuda:0 and cuda:1" if gpus >= 2 else "both ranks on cuda:0 (no NVLink: the kernel's floor)"
    markdown = "\n".join([
        "# All-reduce between two tensor-parallel ranks (threads of one process), bf16", "",
        f"{info.get('device')} x{info.get('num_gpus')} · commit {info['commit']} · {info['date']} · ranks on {where}",
        "", f"Time per all-reduce from CUDA graphs of {args.calls} back-to-back calls, {args.replays} replays.", "",
        markdown_table(["size KiB", "peer kernel us", "NCCL us", "peer / NCCL"],
                       [[r["size_kib"], r["peer_us"], r.get("nccl_us"), r.get("peer_over_nccl")] for r in rows]), ""])
    print(markdown)
    write_results("all_reduce", info, {"rows": rows, "calls": args.calls, "replays": args.replays}, markdown)


if __name__ == "__main__":
    main()

"""All-reduce latency between tensor-parallel ranks on threads of one process: NCCL (one group launch
for all ranks, as the engine's :class:`~pdserve.engine.thread_collectives.ThreadRendezvous` does) against
the one-shot peer kernel (:mod:`pdserve.engine.peer_all_reduce`), by message size; and the peer kernel
fused with the residual add and RMSNorm that follow it in a decoder layer, against the all-reduce
(either) followed by the norm kernel, by rows and width.

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
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import markdown_table, run_info, write_results
from pdserve.engine.kernels.peer_all_reduce import WIDE_FROM_BYTES
from pdserve.engine.kernels.rmsnorm import fused_rmsnorm
from pdserve.engine.peer_all_reduce import PeerAllReduce
from pdserve.engine.thread_collectives import ThreadRendezvous

SIZES_KIB = (8, 64, 256, 512, 1024, 4096, 16384, 65536)  # 64 MiB: an 8k-token prefill step of Llama-8B


def time_calls(devices: list[torch.device], rendezvous: ThreadRendezvous,
               make: Callable[[torch.device], list[torch.Tensor]], call: Callable[[int, list[torch.Tensor]], None],
               check: Callable[[list[torch.Tensor]], bool], calls: int, replays: int) -> float:
    """Microseconds per ``call(rank, tensors)`` (``tensors = make(device)`` per rank), from CUDA graphs of
    ``calls`` back-to-back calls on every rank replayed together; ``check`` each rank's tensors after."""
    world = len(devices)
    ready = threading.Barrier(world, timeout=120)
    graphs: list[torch.cuda.CUDAGraph | None] = [None] * world
    states: list[list[torch.Tensor]] = [[] for _ in range(world)]
    streams = [torch.cuda.Stream(device) for device in devices]
    errors: list[BaseException] = []

    def capture(rank: int) -> None:
        try:
            with torch.cuda.device(devices[rank]), torch.cuda.stream(streams[rank]):
                state = states[rank] = make(devices[rank])
                ready.wait()  # (ranks sharing a GPU: no allocation while a peer kernel spins)
                for _ in range(calls):  # warm-up: NCCL's clique formed, the norm kernel compiled
                    call(rank, state)
                streams[rank].synchronize()
                ready.wait()
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    for _ in range(calls):
                        call(rank, state)
                finally:
                    graph.capture_end()
                graphs[rank] = graph
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
    assert all(check(state) for state in states), "a result is wrong"
    return elapsed / (replays * calls) * 1e6


def time_path(devices: list[torch.device], peer: PeerAllReduce | None, size_bytes: int, calls: int,
              replays: int) -> float:
    """Microseconds per all-reduce of ``size_bytes`` of bf16 (NCCL when ``peer`` is None)."""
    rendezvous = ThreadRendezvous(len(devices), peer)

    def call(rank: int, state: list[torch.Tensor]) -> None:
        state[0].fill_(1.0)
        rendezvous.all_reduce(rank, state[0])

    return time_calls(devices, rendezvous, lambda d: [torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=d)],
                      call, lambda state: bool((state[0] == len(devices)).all()), calls, replays)


def time_norm_path(devices: list[torch.device], peer: PeerAllReduce | None, rows: int, hidden: int, fused: bool,
                   calls: int, replays: int) -> float:
    """Microseconds per all-reduce of ``[rows, hidden]`` bf16 followed by the residual-add RMSNorm: the
    fused kernel, or the all-reduce (peer kernel, or NCCL when ``peer`` is None) then the norm kernel.
    Each call also fills the two inputs (two small kernels, in every path)."""
    rendezvous = ThreadRendezvous(len(devices), peer)

    def make(device: torch.device) -> list[torch.Tensor]:
        partial, residual = (torch.empty(rows, hidden, dtype=torch.bfloat16, device=device) for _ in range(2))
        return [partial, residual, torch.ones(hidden, dtype=torch.bfloat16, device=device)]

    def call(rank: int, state: list[torch.Tensor]) -> None:
        partial, residual, weight = state[:3]
        partial.fill_(1.0)
        residual.fill_(0.5)
        if fused:  # the new residual stream lands in ``residual``
            assert rendezvous.all_reduce_rmsnorm(rank, partial, residual, weight, 1e-6)
            return
        rendezvous.all_reduce(rank, partial)
        _, total = fused_rmsnorm(partial, weight, 1e-6, residual)  # type: ignore[misc]
        state[3:] = [total]

    return time_calls(devices, rendezvous, make, call,
                      lambda state: bool((state[-1 if not fused else 1] == len(devices) + 0.5).all()), calls, replays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--sizes-kib", default=",".join(map(str, SIZES_KIB)))
    parser.add_argument("--norm-rows", default="1,8,32,128", help="rows (tokens) of the fused-norm cases")
    parser.add_argument("--norm-hidden", default="4096,8192", help="widths of the fused-norm cases (8B, 70B)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    gpus = torch.cuda.device_count()
    devices = [torch.device("cuda", rank % gpus) for rank in range(2)]
    info = run_info()
    rows: list[dict[str, Any]] = []
    sizes = [int(k) for k in args.sizes_kib.split(",")]
    peer = PeerAllReduce.build(devices, max(sizes) * 1024)  # built once (it loads its kernels): each size picks a grid
    for kib in sizes:
        row: dict[str, Any] = {"size_kib": kib}
        row["peer_us"] = round(time_path(devices, peer, kib * 1024, args.calls, args.replays), 2)
        if gpus >= 2:
            row["nccl_us"] = round(time_path(devices, None, kib * 1024, args.calls, args.replays), 2)
            row["peer_over_nccl"] = round(row["peer_us"] / row["nccl_us"], 3)
        print(row, flush=True)
        rows.append(row)
    norm_rows: list[dict[str, Any]] = []
    hiddens, counts = [int(h) for h in args.norm_hidden.split(",")], [int(r) for r in args.norm_rows.split(",")]
    peer = PeerAllReduce.build(devices, max(c * h * 2 for c in counts for h in hiddens), norm_widths=tuple(hiddens))
    for hidden in hiddens:
        for count in counts:
            fits = count * hidden * 2 <= WIDE_FROM_BYTES  # the fused kernel's rows (above: all-reduce, then norm)
            row = {"rows": count, "hidden": hidden,
                   "fused_us": round(time_norm_path(devices, peer, count, hidden, True, args.calls, args.replays), 2)
                   if fits else None,
                   "peer_then_norm_us": round(time_norm_path(devices, peer, count, hidden, False, args.calls,
                                                             args.replays), 2)}
            if gpus >= 2:
                row["nccl_then_norm_us"] = round(time_norm_path(devices, None, count, hidden, False, args.calls,
                                                                args.replays), 2)
            print(row, flush=True)
            norm_rows.append(row)
    where = "cuda:0 and cuda:1" if gpus >= 2 else "both ranks on cuda:0 (no NVLink: the kernel's floor)"
    markdown = "\n".join([
        "# All-reduce between two tensor-parallel ranks (threads of one process), bf16", "",
        f"{info.get('device')} x{info.get('num_gpus')} · commit {info['commit']} · {info['date']} · ranks on {where}",
        "", f"Time per all-reduce from CUDA graphs of {args.calls} back-to-back calls, {args.replays} replays.", "",
        markdown_table(["size KiB", "peer kernel us", "NCCL us", "peer / NCCL"],
                       [[r["size_kib"], r["peer_us"], r.get("nccl_us"), r.get("peer_over_nccl")] for r in rows]), "",
        "## All-reduce + residual add + RMSNorm (what follows every row-parallel projection of a decoder layer)", "",
        "Per call, including two fills of the inputs in every path.", "",
        markdown_table(["rows", "hidden", "fused kernel us", "peer all-reduce + norm kernel us", "NCCL + norm kernel us"],
                       [[r["rows"], r["hidden"], r["fused_us"], r["peer_then_norm_us"], r.get("nccl_then_norm_us")]
                        for r in norm_rows]), ""])
    print(markdown)
    write_results("all_reduce", info, {"rows": rows, "norm_rows": norm_rows, "calls": args.calls,
                                       "replays": args.replays}, markdown)

if __name__ == "__main__":
    main()

"""Diagnostic: can a prefill process write KV blocks straight into a decode process's cache on a peer GPU?

Two processes, each seeing both GPUs with its own first (as the CUDA IPC transport arranges):
the "decode" one allocates Llama-3.1-8B-shaped caches and exports them with CUDA IPC; the "prefill"
one maps them, launches the block-copy kernel per layer (peer stores over NVLink) and times it against
a plain contiguous cross-device copy of the same bytes. The decode side checks every byte landed.

    python -m benchmarks.ipc_probe        # needs two GPUs; writes benchmarks/results/ipc_probe-<device>.*

``PROBE_OWN_ONLY=1`` runs both processes seeing only their own GPU (as under Ray); otherwise each sees
both, its own first. The ceiling in the same run is a contiguous peer copy of the same bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

LAYERS, BLOCK, HEADS, DIM = 32, 16, 8, 128
NUM_BLOCKS = 4096


def _decode(conn: mp.connection.Connection) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "1" if os.environ.get("PROBE_OWN_ONLY") else "1,0"
    import torch

    caches = [torch.zeros(2, NUM_BLOCKS, BLOCK, HEADS, DIM, dtype=torch.bfloat16, device="cuda:0")
              for _ in range(LAYERS)]
    conn.send([c.untyped_storage()._share_cuda_() for c in caches])
    while True:
        msg = conn.recv()
        if msg is None:
            return
        dst_ids = torch.tensor(msg["dst_ids"], device="cuda:0")
        torch.cuda.synchronize()
        sums = [float(c.index_select(1, dst_ids).double().sum()) for c in caches]
        conn.send(sums)


def _prefill(conn: mp.connection.Connection, out: mp.connection.Connection) -> None:
    own_only = bool(os.environ.get("PROBE_OWN_ONLY"))
    os.environ["CUDA_VISIBLE_DEVICES"] = "0" if own_only else "0,1"
    import faulthandler

    faulthandler.enable()
    import torch

    from pdserve.kvtransfer.block_copy import copy_blocks

    shares = conn.recv()
    torch.cuda.init()  # _new_shared_cuda needs an initialised CUDA runtime
    remote = []
    for share in shares:
        # opened while device 0 is current: the mapping lives in this device's context, with peer
        # access to the device that owns the memory, and the tensor is labelled cuda:0
        storage = torch.UntypedStorage._new_shared_cuda(0, *share[1:])
        t = torch.empty(0, dtype=torch.bfloat16, device="cuda:0")
        t.set_(storage, 0, (2, NUM_BLOCKS, BLOCK, HEADS, DIM))
        remote.append(t)
    torch.cuda.set_device(0)
    src = [torch.randn(2, NUM_BLOCKS, BLOCK, HEADS, DIM, device="cuda:0").to(torch.bfloat16) for _ in range(LAYERS)]
    stream = torch.cuda.Stream(0)
    results = []
    gen = torch.Generator().manual_seed(0)
    for n in (128, 512, 2048):
        src_ids_list = torch.randperm(NUM_BLOCKS, generator=gen)[:n].tolist()
        dst_ids_list = torch.randperm(NUM_BLOCKS, generator=gen)[:n].tolist()
        src_ids = torch.tensor(src_ids_list, device="cuda:0")
        dst_ids = torch.tensor(dst_ids_list, device="cuda:0")
        nbytes = LAYERS * 2 * n * BLOCK * HEADS * DIM * 2
        with torch.cuda.stream(stream):
            for layer in range(LAYERS):
                copy_blocks(src[layer], remote[layer], src_ids, dst_ids)
            stream.synchronize()
            times = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                start.record()
                for layer in range(LAYERS):
                    copy_blocks(src[layer], remote[layer], src_ids, dst_ids)
                end.record()
                host_s = time.perf_counter() - t0
                end.synchronize()
                times.append((start.elapsed_time(end) / 1e3, host_s))
            layer_bytes = nbytes // LAYERS
            contiguous_src = torch.empty(layer_bytes, dtype=torch.uint8, device="cuda:0")
            contiguous_dst = [r.view(-1).view(torch.uint8)[:layer_bytes] for r in remote]
            for d in contiguous_dst:
                d.copy_(contiguous_src, non_blocking=True)
            stream.synchronize()
            ctimes = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for d in contiguous_dst:
                    d.copy_(contiguous_src, non_blocking=True)
                end.record()
                end.synchronize()
                ctimes.append(start.elapsed_time(end) / 1e3)
        with torch.cuda.stream(stream):
            for layer in range(LAYERS):
                copy_blocks(src[layer], remote[layer], src_ids, dst_ids)
            stream.synchronize()
        expected = [float(s.index_select(1, src_ids).double().sum()) for s in src]
        conn.send({"dst_ids": dst_ids_list})
        got = conn.recv()
        best = min(t for t, _ in times)
        results.append({"blocks": n, "tokens": n * BLOCK, "MB": nbytes / 1e6, "kernel_ms": best * 1e3,
                        "kernel_GBps": nbytes / best / 1e9, "host_launch_ms": min(h for _, h in times) * 1e3,
                        "memcpy_peer_GBps": nbytes / min(ctimes) / 1e9, "bytes_match": got == expected})
    conn.send(None)
    out.send(results)


def main() -> int:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    out_r, out_w = ctx.Pipe(duplex=False)
    decode = ctx.Process(target=_decode, args=(b,))
    prefill = ctx.Process(target=_prefill, args=(a, out_w))
    decode.start()
    prefill.start()
    prefill.join(300)
    decode.join(30)
    if not out_r.poll(1):
        print("probe failed: exit codes", prefill.exitcode, decode.exitcode)
        return 1
    results = out_r.recv()
    from benchmarks.common import markdown_table, run_info, write_results

    info = run_info()
    visibility = "own GPU only" if os.environ.get("PROBE_OWN_ONLY") else "both GPUs"
    md = "\n".join([
        "# CUDA IPC block-copy probe", "", f"{info.get('device')} x{info.get('num_gpus')} · commit {info['commit']} · "
        f"{info['date']} · each process sees {visibility}", "",
        "Llama-3.1-8B-shaped blocks (16 tokens x 8 KV heads x 128, bf16), 32 layers, random block ids; "
        "kernel = one block-copy launch per layer into the peer process's mapped cache; ceiling = "
        "contiguous peer copy of the same bytes, same run.", "",
        markdown_table(list(results[0]), [list(r.values()) for r in results])])
    print(md)
    write_results("ipc_probe", info, {"visibility": visibility, "rows": results}, md)
    return 0 if all(r["bytes_match"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Diagnostic (not a benchmark): where one KV transfer's time goes on the device, per transport setting.

Two processes (cuda:0 sends, cuda:1 receives) move one prompt's KV (Llama-3.1-8B shapes) as
``benchmarks.kv_transfer`` does, under each ``--variant`` (``name:ENV=VALUE,ENV=VALUE``: pdserve's KV
knobs, read at import in the spawned processes). Per variant and prompt size: the median wall time of
three transfers, and one transfer under ``torch.profiler`` on both sides, summarised as the device
kernels in start order (name, stream, start and duration in us from the first one) and the busy time per
kind (NCCL, gather, scatter, other). Writes ``timeline.json`` under ``--out``.

    python -m benchmarks.kv_timeline --out /tmp/kv --variant base: --variant big:PDSERVE_KV_MAX_MESSAGE_BYTES=1073741824
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from benchmarks.kv_transfer import BLOCK, LAYERS, _caches, _layout


def _kind(name: str) -> str:
    lowered = name.lower()
    if "nccl" in lowered:
        return "nccl"
    if "index_select" in lowered or "indexselect" in lowered or "gather" in lowered:
        return "gather"
    if "scatter" in lowered or "index_copy" in lowered or "indexcopy" in lowered or "put" in lowered:
        return "scatter"
    return "other"


def _summarise(prof: Any) -> dict[str, Any]:
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not events:
        return {"kernels": [], "busy_us": {}}
    origin = min(e.time_range.start for e in events)
    kernels = sorted(({"name": e.name[:70], "stream": getattr(e, "device_resource_id", None),
                       "start_us": round(e.time_range.start - origin, 1),
                       "dur_us": round(e.time_range.end - e.time_range.start, 1)} for e in events),
                     key=lambda k: k["start_us"])
    busy: dict[str, float] = {}
    for k in kernels:
        busy[_kind(k["name"])] = round(busy.get(_kind(k["name"]), 0.0) + k["dur_us"], 1)
    span = max(k["start_us"] + k["dur_us"] for k in kernels)
    return {"span_us": round(span, 1), "busy_us": busy, "kernels": kernels[:400]}


def _worker(rank: int, tokens_list: list[int], env: dict[str, str], src_layout: str, inbox: Any, outbox: Any,
            results: Any) -> None:
    os.environ.update(env)
    from pdserve.kvtransfer import open_receiver, open_sender

    torch.cuda.set_device(rank)
    caches = _caches(max(tokens_list) // BLOCK + 2, f"cuda:{rank}")
    layout = _layout()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
    out: dict[str, Any] = {}
    if rank == 1:
        receiver, bootstrap = open_receiver("127.0.0.1", 0, "timeline", caches=caches, layout=layout,
                                            backend="nccl")
        outbox.put(bootstrap)
        tid = 0
        for tokens in tokens_list:
            times = []
            for rep in range(5):  # 0: warm-up, 1-3: timed, 4: profiled
                tid += 1
                handle = receiver.expect(tid, f"r{tid}", list(range(1, tokens // BLOCK + 1)), LAYERS, deadline_s=60)
                if rep == 4:
                    profiler.start()
                outbox.put(tid)
                t0 = inbox.get()
                while not (state := receiver.poll(handle)).is_terminal:
                    time.sleep(2e-5)
                elapsed = time.time() - t0
                torch.cuda.synchronize()
                assert state.name == "DONE", (state, handle.error)
                if rep == 4:
                    profiler.stop()
                    out[str(tokens)] = {"receiver": _summarise(profiler)}
                    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                  torch.profiler.ProfilerActivity.CUDA])
                elif rep:
                    times.append(elapsed)
            out[str(tokens)]["wall_ms"] = round(statistics.median(times) * 1e3, 3)
            out[str(tokens)]["gb_per_s"] = round(tokens * BYTES / statistics.median(times) / 1e9, 1)
        results.put(("receiver", out))
        inbox.get()
        receiver.close()
    else:
        sender = open_sender(inbox.get(), caches, layout)
        for tokens in tokens_list:
            n = tokens // BLOCK
            src = list(range(1, n + 1)) if src_layout == "contiguous" else list(range(1, n + 1))[::-1]
            for rep in range(5):
                tid = inbox.get()
                handle = sender.begin(tid, f"r{tid}", list(range(1, n + 1)))
                torch.cuda.synchronize()
                if rep == 4:
                    profiler.start()
                outbox.put(time.time())
                for layer in range(LAYERS):
                    sender.send_layer(handle, layer, caches[layer], src, (0, n))
                sender.finish(handle, [7])
                sender.wait(handle, 60)
                torch.cuda.synchronize()
                if rep == 4:
                    profiler.stop()
                    out[str(tokens)] = {"sender": _summarise(profiler)}
                    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                  torch.profiler.ProfilerActivity.CUDA])
        results.put(("sender", out))
        outbox.put("bye")
        sender.close()


BYTES = 2 * LAYERS * 8 * 128 * 2  # KV bytes per token


def run_variant(tokens_list: list[int], env: dict[str, str], src_layout: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    a_to_b, b_to_a, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(0, tokens_list, env, src_layout, b_to_a, a_to_b, results)),
             ctx.Process(target=_worker, args=(1, tokens_list, env, src_layout, a_to_b, b_to_a, results))]
    for p in procs:
        p.start()
    merged: dict[str, Any] = {}
    for _ in range(2):
        _, part = results.get(timeout=300)
        for tokens, data in part.items():
            merged.setdefault(tokens, {}).update(data)
    for p in procs:
        p.join(60)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,32768")
    parser.add_argument("--variant", action="append", default=[], help="name:ENV=VALUE,... (repeatable)")
    parser.add_argument("--src", choices=["contiguous", "reversed"], default="reversed",
                        help="source block order (reversed: the sender gathers, as kv_transfer does)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    report: dict[str, Any] = {}
    for spec in args.variant or ["base:"]:
        name, _, assignments = spec.partition(":")
        src = "contiguous" if name.endswith("-contig") else args.src
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
        report[name] = {"env": env, "src": src, "sizes": run_variant(tokens, env, src)}
        for size, data in report[name]["sizes"].items():
            print(f"{name:>12} {size:>6} tokens: {data['wall_ms']:8.2f} ms {data['gb_per_s']:6.1f} GB/s  "
                  f"sender {data['sender'].get('busy_us')} span {data['sender'].get('span_us')}  "
                  f"receiver {data['receiver'].get('busy_us')} span {data['receiver'].get('span_us')}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timeline.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

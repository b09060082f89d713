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
            results: Any, log_path: str) -> None:
    import logging
    import sys
    import traceback

    sys.stdout = sys.stderr = open(log_path, "a", buffering=1)  # noqa: SIM115 (the process's log)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        _work(rank, tokens_list, env, src_layout, inbox, outbox, results)
    except BaseException:
        traceback.print_exc()
        results.put(("error", {"rank": rank, "error": traceback.format_exc()[-2000:]}))
        raise


def _work(rank: int, tokens_list: list[int], env: dict[str, str], src_layout: str, inbox: Any, outbox: Any,
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
                                            backend="nccl", op_timeout_s=15)
        outbox.put(bootstrap)
        tid = 0
        for tokens in tokens_list:
            times = []
            for rep in range(5):  # 0: warm-up, 1-3: timed, 4: profiled
                tid += 1
                handle = receiver.expect(tid, f"r{tid}", list(range(1, tokens // BLOCK + 1)), LAYERS, deadline_s=20)
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
        sender = open_sender(inbox.get(), caches, layout, op_timeout_s=15)
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
                sender.wait(handle, 20)
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


def run_variant(tokens_list: list[int], env: dict[str, str], src_layout: str, log_dir: Path) -> dict[str, Any]:
    """One sender/receiver pair under ``env``; a pair that fails or hangs is reported, not waited for."""
    ctx = mp.get_context("spawn")
    a_to_b, b_to_a, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, tokens_list, env, src_layout, *queues, results,
                                                str(log_dir / f"rank{rank}.log")))
             for rank, queues in ((0, (b_to_a, a_to_b)), (1, (a_to_b, b_to_a)))]
    for p in procs:
        p.start()
    merged: dict[str, Any] = {}
    try:
        for _ in range(2):
            kind, part = results.get(timeout=60)
            if kind == "error":
                merged["error"] = part
                break
            for tokens, data in part.items():
                merged.setdefault(tokens, {}).update(data)
    except Exception as exc:  # noqa: BLE001 (queue.Empty: a hung pair)
        merged["error"] = {"error": f"no result within 60 s ({exc!r})"}
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    return merged


def _probe_case(rank: int, case: str, port: int, results: Any) -> None:
    """One coalescing case between two raw NCCL groups: 4 messages of 64 MiB, sender -> receiver."""
    import datetime
    import threading

    import torch.distributed as dist

    from pdserve.kvtransfer.coalescing import run_coalesced
    from pdserve.kvtransfer.rendezvous import create_pair_group

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 1, datetime.timedelta(seconds=30))
    group = create_pair_group("nccl", dist.PrefixStore("p", store), rank, datetime.timedelta(seconds=20), case)
    hello = torch.zeros(8, dtype=torch.uint8, device=f"cuda:{rank}")
    (group.send([hello], 1, 0) if rank == 0 else group.recv([hello], 0, 0)).wait()
    buffers = [torch.full((64 << 20,), rank + i, dtype=torch.uint8, device=f"cuda:{rank}") for i in range(4)]
    sender_mode, receiver_mode = case.split("->")
    mode = sender_mode if rank == 0 else receiver_mode

    def op(b: torch.Tensor) -> Any:
        return group.send([b], 1, 0) if rank == 0 else group.recv([b], 0, 0)

    def run() -> None:
        if mode.startswith("coal"):
            stream = torch.cuda.Stream() if mode == "coal-thread" else torch.cuda.current_stream()
            with torch.cuda.stream(stream):
                work = run_coalesced(group, [lambda b=b: op(b) for b in buffers])
            print(rank, case, "end_coalescing returned", type(work).__name__, flush=True)
            work.wait()
        else:
            for w in [op(b) for b in buffers]:
                w.wait()
        torch.cuda.synchronize()

    error: list[str] = []
    thread = threading.Thread(target=lambda: _catch(run, error))
    thread.start()
    thread.join(25)
    ok = not thread.is_alive() and not error and (rank == 0 or all(
        int(b[0].item()) == i and int(b[-1].item()) == i for i, b in enumerate(buffers)))
    results.put((rank, case, "hung" if thread.is_alive() else (error[0] if error else ("ok" if ok else "wrong"))))
    results.close()
    results.join_thread()  # flush the answer before leaving without NCCL's teardown
    os._exit(0)


def _catch(fn: Any, error: list[str]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        error.append(repr(exc)[:300])


def coalescing_probe() -> dict[str, str]:
    ctx = mp.get_context("spawn")
    out = {}
    # one side coalescing while the other posts one by one hangs (measured on 2xH200, NCCL 2.28): not probed
    for n, case in enumerate(["ind->ind", "coal->coal", "coal->coal-thread"]):
        results = ctx.Queue()
        procs = [ctx.Process(target=_probe_case, args=(rank, case, 29700 + n, results)) for rank in (0, 1)]
        for p in procs:
            p.start()
        verdicts = []
        for _ in range(2):
            try:
                verdicts.append(results.get(timeout=40))
            except Exception:  # noqa: BLE001
                verdicts.append(("?", case, "no answer"))
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        out[case] = " / ".join(f"rank {r}: {v}" for r, _, v in sorted(verdicts, key=str))
        print("probe", case, out[case], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,32768")
    parser.add_argument("--variant", action="append", default=[], help="name:ENV=VALUE,... (repeatable)")
    parser.add_argument("--src", choices=["contiguous", "reversed"], default="reversed",
                        help="source block order (reversed: the sender gathers, as kv_transfer does)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--probe", action="store_true", help="first try coalesced sends/receives on raw groups")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"probe": coalescing_probe()} if args.probe else {}
    (args.out / "timeline.json").write_text(json.dumps(report, indent=1))
    for spec in args.variant or ["base:"]:
        name, _, assignments = spec.partition(":")
        src = "contiguous" if name.endswith("-contig") else args.src
        env = dict(a.split("=", 1) for a in assignments.split(",") if a)
        log_dir = args.out / name
        log_dir.mkdir(parents=True, exist_ok=True)
        report[name] = {"env": env, "src": src, "sizes": run_variant(tokens, env, src, log_dir)}
        (args.out / "timeline.json").write_text(json.dumps(report, indent=1))
        if "error" in report[name]["sizes"]:
            print(f"{name:>12} failed: {report[name]['sizes']['error']}", flush=True)
            continue
        for size, data in report[name]["sizes"].items():
            print(f"{name:>12} {size:>6} tokens: {data['wall_ms']:8.2f} ms {data['gb_per_s']:6.1f} GB/s  "
                  f"sender {data['sender'].get('busy_us')} span {data['sender'].get('span_us')}  "
                  f"receiver {data['receiver'].get('busy_us')} span {data['receiver'].get('span_us')}", flush=True)


if __name__ == "__main__":
    main()

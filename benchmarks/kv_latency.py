"""Diagnostic (prints, writes no result file): fixed per-transfer latency of the process-group KV transport (small prompts, where bytes do not matter).

Two spawned processes, as in :func:`benchmarks.kv_transfer.bench_transport` (same layout: Llama-3.1-8B
shapes, 128 KiB of KV per token over 32 layers): the sender calls ``send_layer`` for every layer, then
``finish``; the receiver waits for DONE. Latency = sender's clock before the first ``send_layer`` -> the
receiver seeing DONE. Both sides stamp ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux: one clock for
every process of the host), so no message has to carry the start time (``kv_transfer``'s receiver gets it
through a ``multiprocessing`` queue before it starts polling, which adds that queue's latency whenever the
transfer is faster than it).

    python -m benchmarks.kv_latency --tokens 16,64 --reps 40            # CPU, gloo
    python -m benchmarks.kv_latency --tokens 16 --trace                 # + where the time goes

``--trace`` wraps (monkeypatches, in the benchmark processes only) the transport's steps and prints the
median time of each, relative to the sender's start: the sender thread's wake-up, plan gathering, the
PLAN push, the bulk send, the FINISH push; the receiver's pops, landing, FINISH delivery and DONE.
``--wait`` makes the receiver block in ``receiver.wait`` instead of polling with 20 us sleeps.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from typing import Any

import torch.multiprocessing as mp

from benchmarks.kv_transfer import BLOCK, LAYERS, _caches, _layout


def _stamp(log: list[tuple[str, float]], name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        log.append((name + ">", time.perf_counter()))
        try:
            return fn(*args, **kwargs)
        finally:
            log.append((name + "<", time.perf_counter()))
    return wrapper


def _trace_sender(log: list[tuple[str, float]]) -> None:
    from pdserve.kvtransfer import pg_sender
    from pdserve.kvtransfer.messages import Header

    cls = pg_sender.ProcessGroupSender
    for name in ("_take_plan", "_send_plan", "_payload", "_send"):
        setattr(cls, name, _stamp(log, f"s.{name}", getattr(cls, name)))
    push = pg_sender.SealedQueue.push

    def traced_push(self: Any, payload: bytes) -> None:
        kind = Header.unpack(payload).kind.name
        log.append((f"s.push.{kind}>", time.perf_counter()))
        push(self, payload)
        log.append((f"s.push.{kind}<", time.perf_counter()))
    pg_sender.SealedQueue.push = traced_push  # type: ignore[method-assign]


def _trace_receiver(log: list[tuple[str, float]]) -> None:
    from pdserve.kvtransfer import landing, pg_receiver, receiving
    from pdserve.kvtransfer.messages import Header

    pop = pg_receiver._pop

    def traced_pop(store: Any, key: str, closing: Any) -> bytes | None:
        log.append(("r.pop>", time.perf_counter()))
        raw = pop(store, key, closing)
        if raw is not None and key == pg_receiver.MESSAGE_QUEUE:
            try:
                kind = Header.unpack(raw).kind.name
            except Exception:  # noqa: BLE001 - sealed values: no kind
                kind = "?"
            log.append((f"r.pop.{kind}<", time.perf_counter()))
        return raw
    pg_receiver._pop = traced_pop
    cls = landing.PlanLanding
    cls._land_on_host = _stamp(log, "r.land", cls._land_on_host)  # type: ignore[method-assign]
    core = receiving.ReceiverCore
    core.deliver_finish = _stamp(log, "r.finish", core.deliver_finish)  # type: ignore[method-assign]
    core.deliver_layer = _stamp(log, "r.deliver_layer", core.deliver_layer)  # type: ignore[method-assign]


def _worker(rank: int, tokens_list: list[int], reps: int, queue_in: Any, queue_out: Any, results: Any,
            trace: bool, wait: bool, queue_start: bool) -> None:
    import sys

    sys.setswitchinterval(0.001)  # what pdserve's worker processes run with
    from pdserve.kvtransfer import open_receiver, open_sender

    log: list[tuple[str, float]] = []
    if trace:
        (_trace_receiver if rank == 1 else _trace_sender)(log)
    caches = _caches(max(tokens_list) // BLOCK + 2, "cpu")
    layout = _layout()
    if rank == 1:
        receiver, bootstrap = open_receiver("127.0.0.1", 0, "bench", caches=caches, layout=layout, backend="gloo")
        queue_out.put(bootstrap)
        done: dict[int, float] = {}
        logs: dict[int, list[tuple[str, float]]] = {}
        for tokens in tokens_list:
            for rep in range(reps + 1):
                ids = list(range(1, tokens // BLOCK + 1))
                tid = rep * 100000 + tokens
                handle = receiver.expect(tid, f"r{tid}", ids, LAYERS, deadline_s=60)
                del log[:]
                queue_out.put(tid)
                if queue_start:  # as kv_transfer's receiver: poll only once the sender's start arrived
                    queue_in.get()
                    log.append(("r.start_received", time.perf_counter()))
                if wait:
                    state = receiver.wait(handle, 60)
                else:
                    end = time.monotonic() + 60
                    while not (state := receiver.poll(handle)).is_terminal and time.monotonic() < end:
                        time.sleep(2e-5)
                done[tid] = time.perf_counter()
                assert state.name == "DONE", (state, handle.error)
                assert queue_in.get() == tid  # the sender saw DONE too: the next one starts from idle
                logs[tid] = list(log)
        results.put({"done": done, "logs": logs})
        receiver.close()
    else:
        bootstrap = queue_in.get()
        sender = open_sender(bootstrap, caches, layout)
        starts: dict[int, float] = {}
        logs = {}
        for tokens in tokens_list:
            n = tokens // BLOCK
            src = list(range(1, n + 1))[::-1]
            for _ in range(reps + 1):
                tid = queue_in.get()
                handle = sender.begin(tid, f"r{tid}", list(range(1, n + 1)))
                time.sleep(0.005)  # both sides idle, as between prompts
                del log[:]
                t0 = time.perf_counter()
                if queue_start:
                    queue_out.put(t0)
                for layer in range(LAYERS):
                    sender.send_layer(handle, layer, caches[layer], src, (0, n))
                sender.finish(handle, [7])
                log.append(("s.finish_returned", time.perf_counter()))
                assert sender.wait(handle, 60).name == "DONE"
                starts[tid] = t0
                logs[tid] = list(log)
                queue_out.put(tid)
        results.put({"starts": starts, "logs": logs})
        sender.close()


def run(tokens_list: list[int], reps: int, trace: bool = False, wait: bool = False,
        queue_start: bool = False) -> dict[int, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    a_to_b, b_to_a, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(0, tokens_list, reps, b_to_a, a_to_b, results, trace, wait, queue_start)),
             ctx.Process(target=_worker, args=(1, tokens_list, reps, a_to_b, b_to_a, results, trace, wait, queue_start))]
    for p in procs:
        p.start()
    got = [results.get(timeout=600), results.get(timeout=600)]
    for p in procs:
        p.join(60)
    sender = next(g for g in got if "starts" in g)
    receiver = next(g for g in got if "done" in g)
    out: dict[int, dict[str, Any]] = {}
    for tokens in tokens_list:
        tids = [rep * 100000 + tokens for rep in range(1, reps + 1)]  # rep 0 warms up
        lat = [(receiver["done"][t] - sender["starts"][t]) * 1e3 for t in tids]
        phases: dict[str, list[float]] = defaultdict(list)
        for t in tids:
            t0 = sender["starts"][t]
            count: dict[str, int] = defaultdict(int)
            for name, ts in sender["logs"][t] + receiver["logs"][t]:
                count[name] += 1  # a repeated stamp: numbered, each occurrence on its own
                phases[name if count[name] == 1 else f"{name} #{count[name]}"].append((ts - t0) * 1e3)
            phases["r.DONE seen"].append((receiver["done"][t] - t0) * 1e3)
        q = statistics.quantiles(lat, n=10)
        out[tokens] = {"median_ms": statistics.median(lat), "p10_ms": q[0], "p90_ms": q[-1],
                       "min_ms": min(lat), "phases": {k: statistics.median(v) for k, v in phases.items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="16,64")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--trace", action="store_true", help="print when each step happened (median)")
    parser.add_argument("--wait", action="store_true", help="receiver.wait instead of polling")
    parser.add_argument("--queue-start", action="store_true",
                        help="as kv_transfer: the receiver polls only once the sender's start time reached it "
                             "through a multiprocessing queue")
    args = parser.parse_args()
    out = run([int(t) for t in args.tokens.split(",")], args.reps, args.trace, args.wait, args.queue_start)
    for tokens, r in out.items():
        print(f"{tokens:6d} tokens: median {r['median_ms']:.3f} ms  p10 {r['p10_ms']:.3f}  p90 {r['p90_ms']:.3f}  "
              f"min {r['min_ms']:.3f}", flush=True)
        if args.trace:
            for name, ms in sorted(r["phases"].items(), key=lambda kv: kv[1]):
                print(f"    {ms:8.3f} ms  {name}")


if __name__ == "__main__":
    main()

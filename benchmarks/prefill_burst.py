"""A prefill worker under many short prompts: what streaming each step's KV costs its steps.

Under the ShareGPT-like workload, ``auto``'s one prefill worker runs steps of dozens of short prompts,
each streaming its own KV into a decode worker's cache layer by layer. This benchmark measures that
worker's engine and sender without the rest of the cluster, on one GPU (the "decode worker's cache" is
a second cache on the same GPU, written through the CUDA IPC sender's copy kernel as the real one is):

1. **Layer sends** -- the host time to stream one step's 32 layers for ``n`` prompts of 128 tokens:
   one ``send_layer`` call per layer and prompt (``per-call``, the path before this benchmark) against
   one prepared step per decode worker (``prepared``: one copy kernel per layer, ``prepare_step``).
2. **Replay** -- the prefill worker's engine (the ``auto`` configuration's prefill settings, Llama-3.1-8B
   shapes, dummy weights) fed the serving benchmark's exact ShareGPT-like request sequence (seed, rate per
   GPU x 2 GPUs, as ``benchmarks.serve`` draws it) in real time, with no streaming, per-call streaming
   and prepared streaming. Per request: the time from arrival to its transfer done (FINISH pushed: what
   the decode worker waits for); per step: its device span against the step-time model's prediction
   by the number of prompts in it, and the host time of its launch.

    python -m benchmarks.prefill_burst [--preset tiny] [--rates 32,48] [--seed 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import LLAMA31_8B, markdown_table, run_info, write_model_dir, write_results
from benchmarks.serve import cluster_config
from benchmarks.serving.workload import poisson_schedule, sharegpt_workload
from pdserve.cluster.config import cluster_config_from_dict
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import LLMEngine
from pdserve.engine.step_plan import SchedulerPlan
from pdserve.kvtransfer import KVLayoutInfo, KVSender, LayerSend, TransferHandle, TransferState, open_receiver
from pdserve.kvtransfer.ipc_sender import open_ipc_sender
from pdserve.prefill.layer_streaming import StreamedTransfer, layer_hook_for_step

MODES = ("none", "per-call", "prepared")
PROMPT_BUCKETS = (1, 4, 16, 1 << 30)
BUCKET_NAMES = ("1", "2-4", "5-16", "17+")
#: transfer ids are unique per receiver for the whole run
TRANSFER_IDS = itertools.count(1)


class PerCallSender(KVSender):
    """``sender`` with the default (unbatched) ``prepare_step``/``send_step_layer``: one ``send_layer``
    per layer and prompt, as the prefill role streamed before prepared steps."""

    def __init__(self, sender: KVSender) -> None:
        self.inner = sender

    @property
    def layout(self) -> KVLayoutInfo:
        return self.inner.layout

    def begin(self, transfer_id: int, request_id: str, dst_block_ids: Sequence[int],
              num_skip_blocks: int = 0) -> TransferHandle:
        return self.inner.begin(transfer_id, request_id, dst_block_ids, num_skip_blocks)

    def send_layer(self, handle: TransferHandle, layer: int, kv_cache_layer: torch.Tensor,
                   src_block_ids: Sequence[int], block_range: tuple[int, int]) -> None:
        self.inner.send_layer(handle, layer, kv_cache_layer, src_block_ids, block_range)

    def finish(self, handle: TransferHandle, payload: Sequence[int]) -> None:
        self.inner.finish(handle, payload)

    def poll(self, handle: TransferHandle) -> TransferState:
        return self.inner.poll(handle)

    def cancel(self, handle: TransferHandle) -> None:
        self.inner.cancel(handle)

    def close(self) -> None:
        pass


class StreamingHooks:
    """The prefill role's engine-thread hooks, without a worker: stream every step's chunks of
    ``transfers`` through :func:`layer_hook_for_step`."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.transfers: dict[str, StreamedTransfer] = {}

    def before_forward(self, plan: SchedulerPlan) -> Any:
        return layer_hook_for_step(plan, self.transfers, self.block_size, 1)

    def after_forward(self, plan: SchedulerPlan) -> None:
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_sends(sender: KVSender, receiver: Any, src: list[torch.Tensor], counts: list[int],
                blocks_per_prompt: int, repeats: int = 5) -> list[dict[str, Any]]:
    """Host ms to stream one step's layers of ``n`` prompts, and until the copies completed."""
    device, rows = src[0].device, []
    for n in counts:
        for mode in ("per-call", "prepared"):
            host, total = [], []
            for _ in range(repeats):
                handles = []
                for i in range(n):
                    dst, tid = list(range(1 + i * blocks_per_prompt, 1 + (i + 1) * blocks_per_prompt)), next(TRANSFER_IDS)
                    receiver.expect(tid, f"s{tid}", dst, len(src), 30.0)
                    handles.append(sender.begin(tid, f"s{tid}", dst))
                src_ids = [list(range(1 + i * blocks_per_prompt, 1 + (i + 1) * blocks_per_prompt)) for i in range(n)]
                sync(device)
                start = time.perf_counter()
                if mode == "per-call":
                    for layer, cache in enumerate(src):
                        for handle, ids in zip(handles, src_ids, strict=True):
                            sender.send_layer(handle, layer, cache, ids, (0, blocks_per_prompt))
                else:
                    step = sender.prepare_step([LayerSend(h, ids, (0, blocks_per_prompt))
                                                for h, ids in zip(handles, src_ids, strict=True)])
                    for layer, cache in enumerate(src):
                        sender.send_step_layer(step, layer, cache)
                launched = time.perf_counter()
                sync(device)
                total.append((time.perf_counter() - start) * 1e3)
                host.append((launched - start) * 1e3)
                for handle in handles:
                    sender.finish(handle, [1])
                for handle in handles:
                    sender.wait(handle, 30.0)
            rows.append({"prompts": n, "mode": mode, "host_ms": round(statistics.median(host), 3),
                         "until_copied_ms": round(statistics.median(total), 3)})
    return rows


def replay(engine: LLMEngine, sender: KVSender | None, receiver: Any, specs: list[Any], offsets: list[float],
           dst_blocks: int, tag: str) -> dict[str, Any]:
    """Feed ``specs`` at ``offsets`` (seconds) into ``engine`` as a prefill worker gets them; stream each
    prompt's KV through ``sender`` (None: no streaming). Returns per-request and per-step records."""
    bs = engine.kv.block_size
    hooks = StreamingHooks(bs) if sender is not None else None
    engine.step_hooks = hooks
    spans: list[tuple[Any, float]] = []
    monitor = engine.step_monitor
    record = monitor.record if monitor is not None else None
    if monitor is not None and record is not None:
        def recording(shape: Any, seconds: float) -> bool:
            spans.append((shape, seconds))
            return record(shape, seconds)
        monitor.record = recording  # type: ignore[method-assign]
    launches: list[tuple[int, float]] = []  # (prompts in the step, host ms of its launch)
    runner_launch = engine.runner.launch

    def timed_launch(plan: SchedulerPlan, timed: bool = False) -> Any:
        start = time.perf_counter()
        try:
            return runner_launch(plan, timed)
        finally:
            launches.append((len(plan.chunks), (time.perf_counter() - start) * 1e3))
    engine.runner.launch = timed_launch  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    arrival, first_at, done_at, waiting = {}, {}, {}, {}
    next_dst, i, n = 1, 0, len(specs)
    t0 = time.perf_counter()
    try:
        while i < n or engine.has_unfinished_requests() or waiting:
            now = time.perf_counter() - t0
            while i < n and offsets[i] <= now:
                rid = f"{tag}-{i}"
                ids = specs[i].prompt_token_ids
                arrival[rid] = offsets[i]
                if hooks is not None and sender is not None:
                    count = -(-len(ids) // bs)
                    if next_dst + count >= dst_blocks:
                        next_dst = 1
                    dst = list(range(next_dst, next_dst + count))
                    next_dst += count
                    tid = next(TRANSFER_IDS)
                    receiver.expect(tid, rid, dst, sender.layout.num_layers, 60.0)
                    hooks.transfers[rid] = StreamedTransfer(sender, sender.begin(tid, rid, dst))
                engine.add_request(rid, prompt_token_ids=ids, params=params, prefill_only=True)
                i += 1
            if engine.has_unfinished_requests():
                deltas = engine.step()
                stamp = time.perf_counter() - t0
                for delta in deltas:
                    if not delta.finished:
                        continue
                    first_at[delta.request_id] = stamp
                    transfer = hooks.transfers.get(delta.request_id) if hooks is not None else None
                    if transfer is None:
                        done_at[delta.request_id] = stamp
                        engine.release_held_blocks(delta.request_id)
                    else:
                        transfer.sender.finish(transfer.handle, [delta.new_token_ids[0]])
                        waiting[delta.request_id] = transfer
            for rid, transfer in list(waiting.items()):
                if transfer.sender.poll(transfer.handle).is_terminal:
                    done_at[rid] = time.perf_counter() - t0
                    engine.release_held_blocks(rid)
                    del waiting[rid]
                    assert hooks is not None
                    del hooks.transfers[rid]
            if not engine.has_unfinished_requests() and i < n and not waiting:
                time.sleep(max(0.0, min(offsets[i] - (time.perf_counter() - t0), 0.002)))
            elif not engine.has_unfinished_requests() and waiting:
                time.sleep(0.0002)
    finally:
        engine.step_hooks = None
        engine.runner.launch = runner_launch  # type: ignore[method-assign]
        if monitor is not None and record is not None:
            monitor.record = record  # type: ignore[method-assign]
    ttft = sorted(done_at[r] - arrival[r] for r in done_at)
    return {"ttft_s": ttft, "first_token_s": sorted(first_at[r] - arrival[r] for r in first_at),
            "spans": spans, "launch_ms": launches, "requests": n}


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summarize(run: dict[str, Any], model: Any, slo_s: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ttft = run["ttft_s"]
    summary = {"ttft_p50_ms": round(pct(ttft, 0.5) * 1e3, 1), "ttft_p90_ms": round(pct(ttft, 0.9) * 1e3, 1),
               "ttft_p99_ms": round(pct(ttft, 0.99) * 1e3, 1),
               "within_slo": round(sum(t <= slo_s for t in ttft) / max(1, run["requests"]), 3),
               "steps": len(run["spans"]), "busy_s": round(sum(s for _, s in run["spans"]), 3),
               "launch_ms_mean": round(statistics.fmean(h for _, h in run["launch_ms"]), 2) if run["launch_ms"] else None}
    buckets: dict[int, list[tuple[float, float, float]]] = {}
    for (shape, seconds), (prompts, launch) in zip(run["spans"], run["launch_ms"], strict=False):
        key = next(i for i, top in enumerate(PROMPT_BUCKETS) if prompts <= top)
        buckets.setdefault(key, []).append((seconds, model.predict(shape), launch))
    rows = [{"prompts": BUCKET_NAMES[key], "steps": len(v),
             "measured_ms": round(statistics.fmean(s for s, _, _ in v) * 1e3, 2),
             "predicted_ms": round(statistics.fmean(p for _, p, _ in v) * 1e3, 2),
             "ratio": round(sum(s for s, _, _ in v) / sum(p for _, p, _ in v), 2),
             "launch_ms": round(statistics.fmean(h for _, _, h in v), 2)}
            for key, v in sorted(buckets.items())]
    return summary, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("llama31-8b", "tiny"), default="llama31-8b")
    parser.add_argument("--rates", default="32,48", help="req/s per GPU (x2 GPUs, as benchmarks.serve)")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--ttft-slo-ms", type=float, default=250.0)
    args = parser.parse_args()
    from benchmarks.engine import TINY

    tiny = args.preset == "tiny"
    info = run_info()
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(Path(tmp) / "model", TINY if tiny else LLAMA31_8B)
        config = cluster_config_from_dict(cluster_config("auto", model_dir, smoke=not torch.cuda.is_available(),
                                                         slo_ms=(args.ttft_slo_ms, 15.0)))
        # prefix caching off: every mode replays the same prompts, which must not hit the blocks of the last
        engine_config = dataclasses.replace(config.engine_config("prefill"), enable_prefix_caching=False)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        spec_layers = (TINY if tiny else LLAMA31_8B)["num_hidden_layers"]
        heads = (TINY if tiny else LLAMA31_8B)["num_key_value_heads"]
        head_dim = (TINY if tiny else LLAMA31_8B).get("head_dim", 64)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        dst_blocks = 4096 if device.type == "cuda" else 1024
        # the "decode worker's" cache: allocated first, so the engine sizes its own around it
        dst = [torch.zeros(2, dst_blocks, engine_config.block_size, heads, head_dim, dtype=dtype, device=device)
               for _ in range(spec_layers)]
        engine = LLMEngine(engine_config)
        model = engine.step_time
        layout = KVLayoutInfo.from_caches(engine.runner.kv_caches, "bench")
        receiver, bootstrap = open_receiver(caches=dst, layout=KVLayoutInfo.from_caches(dst, "bench"),
                                            group_name="prefill-burst", accept_one_sided=True)
        sender = open_ipc_sender(bootstrap, engine.runner.kv_caches, layout, remote_caches=dst, name="burst")
        try:
            sends = bench_sends(sender, receiver, engine.runner.kv_caches, [1, 8, 32, 64], blocks_per_prompt=8)
            runs: dict[str, Any] = {}
            table, steps_rows = [], []
            for rate in rates:
                specs = sharegpt_workload(args.num_requests, args.seed)
                offsets = poisson_schedule(len(specs), rate * 2, seed=args.seed)
                # warm up on another sequence: a shape first met in the measured one costs what it costs a worker
                warm = sharegpt_workload(args.num_requests, args.seed + 1000)
                run = replay(engine, sender, receiver, warm, poisson_schedule(len(warm), rate * 2, seed=args.seed + 1000),
                             dst_blocks, f"warm-{rate:g}")
                print(f"rate {rate:g} warm-up: {summarize(run, model, args.ttft_slo_ms / 1e3)[0]}", flush=True)
                for mode in MODES:
                    chosen = None if mode == "none" else sender if mode == "prepared" else PerCallSender(sender)
                    run = replay(engine, chosen, receiver, specs, offsets, dst_blocks, f"{mode}-{rate:g}")
                    summary, rows = summarize(run, model, args.ttft_slo_ms / 1e3)
                    runs[f"{mode}-{rate:g}"] = {"summary": summary, "by_prompts": rows}
                    table.append([f"{rate:g}", mode, *summary.values()])
                    steps_rows += [[f"{rate:g}", mode, *r.values()] for r in rows]
                    print(f"rate {rate:g} {mode}: {summary}", flush=True)
        finally:
            sender.close()
            receiver.close()
    markdown = "\n".join([
        f"# Prefill worker under many short prompts ({args.preset})", "",
        f"{info.get('device')} · commit {info['commit']} · {info['date']} · ShareGPT-like seed {args.seed}, "
        f"{args.num_requests} requests per rate (req/s per GPU x 2, as benchmarks.serve); the `auto` "
        f"configuration's prefill engine; KV streamed into a second cache on the same GPU with the CUDA IPC "
        f"sender's copy kernel.", "",
        "## Host cost of one step's layer sends (prompts of 128 tokens, every layer)", "",
        markdown_table(["prompts", "mode", "host ms", "until copied ms"], [list(r.values()) for r in sends]), "",
        "## Replay: arrival to transfer done (TTFT without router, gRPC and decode admission)", "",
        markdown_table(["rate/GPU", "streaming", "p50 ms", "p90 ms", "p99 ms", f"<= {args.ttft_slo_ms:g} ms",
                        "steps", "busy s", "launch ms"], table), "",
        "## Steps by prompts carried: device span vs the step-time model", "",
        markdown_table(["rate/GPU", "streaming", "prompts", "steps", "measured ms", "predicted ms", "ratio",
                        "launch ms"], steps_rows), ""])
    print(markdown)
    if device.type == "cuda" and not tiny:
        write_results("prefill_burst", info, {"sends": sends, "runs": runs, "model": model.to_dict()
                                              if model is not None else None}, markdown)


if __name__ == "__main__":
    main()

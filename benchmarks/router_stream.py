"""The router's cost per streamed token: how many tokens a second one router relays to its clients.

    python -m benchmarks.router_stream                     # CPU, about a minute

Three processes: two fake colocated workers (``tests.unit.test_router_fakes.FakeWorker``: a real gRPC
server whose "engine" emits one token per running request every ``--step-ms``, as a decode step does),
the router (this process: its own event loop on a thread, as the cluster launcher runs it), and one
async client keeping ``--streams`` greedy streams of ``--max-tokens`` tokens open (a new one as each
ends). Measured per setting of ``router.stream_writes_per_s``: tokens per second at the client, the
router process's CPU time per token, and the client's median time to first token. The workers are
fakes so that only the router's work is counted; on a small machine the three processes share its
cores, so the rates are a lower bound and the CPU per token is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import statistics
import threading
import time
from typing import Any

from benchmarks.common import markdown_table, run_info, write_results


def _serve_workers(queue: Any, count: int, step_s: float) -> None:
    from tests.unit.test_router_fakes import FakeWorker

    async def main() -> None:
        workers = [FakeWorker(f"colocated-{i}", "colocated", tokens_per_step=1, step_interval_s=step_s)
                   for i in range(count)]
        queue.put([await w.start() for w in workers])
        await asyncio.Event().wait()  # until the process is terminated

    asyncio.run(main())


def _drive(address: str, requests: int, streams: int, max_tokens: int, queue: Any) -> None:
    from pdserve.client import AsyncClient

    async def main() -> None:
        async with AsyncClient(address, timeout=600) as client:
            tokens, first_token_s = 0, []
            slots = asyncio.Semaphore(streams)
            start = time.monotonic()

            async def one(i: int) -> None:
                nonlocal tokens
                async with slots:
                    sent, first = time.monotonic(), None
                    async for chunk in client.generate_stream(prompt_token_ids=[1, 2, 3, i % 100],
                                                              max_tokens=max_tokens, request_id=f"s{i}"):
                        if chunk.token_ids:
                            first = first if first is not None else time.monotonic() - sent
                            tokens += len(chunk.token_ids)
                    first_token_s.append(first)

            await asyncio.gather(*(one(i) for i in range(requests)))
            queue.put((tokens, time.monotonic() - start, statistics.median(first_token_s)))

    asyncio.run(main())


def measure(writes_per_s: float, streams: int, requests: int, max_tokens: int, step_s: float) -> dict[str, Any]:
    from pdserve.router import Router, RouterConfig, WorkerEndpoint, WorkerRole

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = ctx.Process(target=_serve_workers, args=(queue, 2, step_s), daemon=True)
    workers.start()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        addresses = queue.get(timeout=60)
        config = RouterConfig(host="127.0.0.1", port=0, request_timeout_s=600.0, stream_writes_per_s=writes_per_s)
        endpoints = [WorkerEndpoint(f"colocated-{i}", WorkerRole.COLOCATED, a, "") for i, a in enumerate(addresses)]
        router = Router(config, model="fake-model", mode="colocated", workers=endpoints)
        port = asyncio.run_coroutine_threadsafe(router.start(), loop).result(60)
        client = ctx.Process(target=_drive, args=(f"127.0.0.1:{port}", requests, streams, max_tokens, queue))
        before = resource.getrusage(resource.RUSAGE_SELF)
        client.start()
        tokens, seconds, ttft = queue.get(timeout=900)
        after = resource.getrusage(resource.RUSAGE_SELF)
        client.join(30)
        asyncio.run_coroutine_threadsafe(router.stop(grace=1.0), loop).result(30)
    finally:
        workers.terminate()
        loop.call_soon_threadsafe(loop.stop)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"stream_writes_per_s": writes_per_s, "streams": streams, "tokens": tokens,
            "tokens_per_s": round(tokens / seconds), "router_cpu_us_per_token": round(1e6 * cpu / tokens, 1),
            "router_cores": round(cpu / seconds, 2), "ttft_p50_ms": round(1e3 * ttft, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes-per-s", default="0,10000", help="router.stream_writes_per_s settings")
    parser.add_argument("--streams", default="200,300", help="concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=10.0, help="the fake workers' step time")
    args = parser.parse_args()
    rows = []
    for streams in (int(s) for s in args.streams.split(",")):
        for writes in (float(w) for w in args.writes_per_s.split(",")):
            row = measure(writes, streams, 3 * streams, args.max_tokens, args.step_ms / 1e3)
            print(row, flush=True)
            rows.append(row)
    info = run_info()
    columns = list(rows[0])
    markdown = "\n".join([
        "# Router: cost per streamed token", "",
        f"{info.get('device', 'cpu')} · commit {info['commit']} · {info['date']}", "",
        f"Two fake colocated workers (one token per running request every {args.step_ms:g} ms), the router, one "
        f"client keeping the streams open ({args.max_tokens} tokens each, 3 x streams requests); all three "
        "processes share the machine's cores.", "", markdown_table(columns, [[r[c] for c in columns] for r in rows]), ""])
    print(markdown)
    write_results("router_stream", info, {"settings": vars(args), "rows": rows}, markdown)


if __name__ == "__main__":
    main()

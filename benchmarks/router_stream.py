"""The router's cost per streamed token: how many tokens a second one router relays to its clients.

    python -m benchmarks.router_stream                     # CPU, about a minute

Processes: two fake colocated workers (``tests.unit.test_router_fakes.FakeWorker``: a real gRPC server
whose "engine" emits one token per running request every ``--step-ms``, as a decode step does), the
router (this process: its own event loop on a thread, as the cluster launcher runs it, plus
``router.processes - 1`` more on the same port, ``--router-processes``), and ``--client-processes``
async clients keeping ``--streams`` greedy streams of ``--max-tokens`` tokens open between them (a new
one as each ends) over ``--channels`` connections. Measured per setting: tokens per second at the client, the router
processes' CPU time per token (all of them), and the client's median time to first token. The workers
are fakes so that only the router's work is counted; on a small machine all processes share its cores,
so the rates are a lower bound and the CPU per token is the figure to compare.
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

#: Fake colocated workers, a process each.
NUM_WORKERS = 2


def _serve_worker(queue: Any, index: int, step_s: float) -> None:
    """One fake colocated worker (a process each: the fakes must outpace the router); puts its address."""
    from tests.unit.test_router_fakes import FakeWorker

    async def main() -> None:
        worker = FakeWorker(f"colocated-{index}", "colocated", tokens_per_step=1, step_interval_s=step_s)
        queue.put((index, await worker.start()))
        await asyncio.Event().wait()  # until the process is terminated

    asyncio.run(main())


def _router(addresses: list[str], writes_per_s: float, processes: int, port: int = 0,
            admin_address: str | None = None) -> Any:
    """A router over the fake workers at ``addresses`` (the first of ``processes``, or another on ``port``
    forwarding to ``admin_address``)."""
    from pdserve.router import Router, RouterConfig, WorkerEndpoint, WorkerRole

    config = RouterConfig(host="127.0.0.1", port=port, request_timeout_s=600.0, stream_writes_per_s=writes_per_s,
                          processes=processes)
    endpoints = [WorkerEndpoint(f"colocated-{i}", WorkerRole.COLOCATED, a, "") for i, a in enumerate(addresses)]
    return Router(config, model="fake-model", mode="colocated", workers=endpoints, admin_address=admin_address)


def _serve_router(port: int, admin_address: str, addresses: list[str], writes_per_s: float, processes: int,
                  index: int, queue: Any, stop: Any) -> None:
    """One more router process on ``port`` (``router.processes``); puts ``(index, CPU seconds)`` when
    ``stop`` is set."""

    async def main() -> None:
        router = _router(addresses, writes_per_s, processes, port, admin_address)
        await router.start()
        queue.put(("started", index))
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.to_thread(stop.wait)
        after = resource.getrusage(resource.RUSAGE_SELF)
        queue.put(("cpu", (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)))
        await router.stop(grace=1.0)

    asyncio.run(main())


def _drive(address: str, first: int, requests: int, streams: int, max_tokens: int, channels: int, queue: Any) -> None:
    """A load generator: requests ``first`` .. ``first + requests - 1``, ``streams`` open at a time over
    ``channels`` connections; puts (tokens, seconds, first-token times)."""
    from pdserve.client import AsyncClient

    async def main() -> None:
        clients = [AsyncClient(address, timeout=600) for _ in range(channels)]  # a connection each
        tokens, first_token_s = 0, []
        slots = asyncio.Semaphore(streams)
        start = time.monotonic()

        async def one(i: int) -> None:
            nonlocal tokens
            async with slots:
                sent, first = time.monotonic(), None
                async for chunk in clients[i % channels].generate_stream(
                        prompt_token_ids=[1, 2, 3, i % 100], max_tokens=max_tokens, request_id=f"s{i}"):
                    if chunk.token_ids:
                        first = first if first is not None else time.monotonic() - sent
                        tokens += len(chunk.token_ids)
                first_token_s.append(first)

        await asyncio.gather(*(one(i) for i in range(first, first + requests)))
        queue.put((tokens, time.monotonic() - start, first_token_s))
        for client in clients:
            await client.close()

    asyncio.run(main())


def measure(writes_per_s: float, streams: int, requests: int, max_tokens: int, step_s: float, processes: int = 1,
            channels: int = 4, client_processes: int = 1) -> dict[str, Any]:

    ctx = multiprocessing.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=_serve_worker, args=(queue, i, step_s), daemon=True) for i in range(NUM_WORKERS)]
    for worker in workers:
        worker.start()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    followers: list[Any] = []
    try:
        addresses = [address for _, address in sorted(queue.get(timeout=60) for _ in workers)]
        router = _router(addresses, writes_per_s, processes)
        port = asyncio.run_coroutine_threadsafe(router.start(), loop).result(60)
        for index in range(1, processes):
            followers.append(ctx.Process(target=_serve_router, args=(port, router.admin_address, addresses,
                                                                     writes_per_s, processes, index, queue, stop),
                                         daemon=True))
            followers[-1].start()
        for _ in followers:
            assert queue.get(timeout=60)[0] == "started"
        share, per = requests // client_processes, max(1, channels // client_processes)
        clients = [ctx.Process(target=_drive, args=(f"127.0.0.1:{port}", k * share, share, streams // client_processes,
                                                    max_tokens, per, queue)) for k in range(client_processes)]
        before = resource.getrusage(resource.RUSAGE_SELF)
        for client in clients:
            client.start()
        parts = [queue.get(timeout=900) for _ in clients]
        after = resource.getrusage(resource.RUSAGE_SELF)
        stop.set()
        follower_cpu = sum(queue.get(timeout=60)[1] for _ in followers)
        for client in clients:
            client.join(30)
        tokens, seconds = sum(p[0] for p in parts), max(p[1] for p in parts)
        ttft = statistics.median(t for p in parts for t in p[2])
        asyncio.run_coroutine_threadsafe(router.stop(grace=1.0), loop).result(30)
    finally:
        stop.set()
        for follower in followers:
            follower.join(30)
        for worker in workers:
            worker.terminate()
        loop.call_soon_threadsafe(loop.stop)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) + follower_cpu
    return {"router_processes": processes, "stream_writes_per_s": writes_per_s, "streams": streams, "tokens": tokens,
            "tokens_per_s": round(tokens / seconds), "router_cpu_us_per_token": round(1e6 * cpu / tokens, 1),
            "router_cores": round(cpu / seconds, 2), "ttft_p50_ms": round(1e3 * ttft, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes-per-s", default="0,10000", help="router.stream_writes_per_s settings")
    parser.add_argument("--streams", default="200,300", help="concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=10.0, help="the fake workers' step time")
    parser.add_argument("--router-processes", default="1", help="router.processes settings")
    parser.add_argument("--channels", type=int, default=4, help="client connections (spread over the processes)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="load-generator processes (the streams and connections split among them)")
    args = parser.parse_args()
    rows = []
    for processes in (int(p) for p in args.router_processes.split(",")):
        for streams in (int(s) for s in args.streams.split(",")):
            for writes in (float(w) for w in args.writes_per_s.split(",")):
                row = measure(writes, streams, 3 * streams, args.max_tokens, args.step_ms / 1e3, processes,
                              args.channels, args.client_processes)
                print(row, flush=True)
                rows.append(row)
    info = run_info()
    columns = list(rows[0])
    markdown = "\n".join([
        "# Router: cost per streamed token", "",
        f"{info.get('device', 'cpu')} · commit {info['commit']} · {info['date']}", "",
        f"Two fake colocated workers (one token per running request every {args.step_ms:g} ms), the router, "
        f"{args.client_processes} client process(es) keeping the streams open ({args.max_tokens} tokens each, 3 x streams requests) over "
        f"{args.channels} connections; router CPU counts every router process; all processes share the "
        "machine's cores.", "", markdown_table(columns, [[r[c] for c in columns] for r in rows]), ""])
    print(markdown)
    write_results("router_stream", info, {"settings": vars(args), "rows": rows}, markdown)


if __name__ == "__main__":
    main()

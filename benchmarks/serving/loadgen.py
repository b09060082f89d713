"""The load generator: send requests on a schedule (or at a fixed concurrency) over the async client SDK
and time every token. It reports its own lag (how late each request left against its schedule), and
``client_capacity`` measures how fast a schedule it can keep without any server (a stub stream)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from tqdm import tqdm

from benchmarks.serving.metrics import RequestRecord
from benchmarks.serving.workload import RequestSpec

StreamFn = Callable[[int, RequestSpec], AsyncIterator[int]]
"""``stream(index, spec)`` yields, per received chunk, how many tokens it carried."""


async def run_schedule(stream: StreamFn, specs: list[RequestSpec], offsets: list[float] | None,
                       concurrency: int | None = None, progress: bool = True, label: str = "",
                       indices: Sequence[int] | None = None, start_at: float | None = None
                       ) -> tuple[list[RequestRecord], float, float]:
    """Run every request; returns (records, duration in s, wall-clock start time).

    ``offsets[i]``: when request ``i`` is due (s from the start); ``None`` with ``concurrency`` keeps that
    many requests in flight. Times in the records are seconds from the start (monotonic clock): now, or
    the wall-clock time ``start_at`` (``time.time()``; past: what was due leaves at once and counts as lag).
    ``indices[i]``: request ``i``'s index in the whole schedule (its record's and its stream's; default
    ``i``), for one shard of a schedule run by several processes.
    """
    loop = asyncio.get_running_loop()
    records = [RequestRecord(indices[i] if indices is not None else i, offsets[i] if offsets else 0.0,
                             num_prompt_tokens=len(s.prompt_token_ids)) for i, s in enumerate(specs)]
    bar = tqdm(total=len(specs), desc=label or "requests", unit="req", disable=not progress, leave=False)
    now, wall_now = loop.time(), time.time()  # one instant on both clocks
    start, wall_start = (now, wall_now) if start_at is None else (now + start_at - wall_now, start_at)

    async def one(i: int) -> None:
        record = records[i]
        if offsets is not None:
            delay = start + record.scheduled_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        record.sent_s = loop.time() - start
        if offsets is None:
            record.scheduled_s = record.sent_s
        try:
            async for count in stream(record.index, specs[i]):
                now = loop.time() - start
                record.token_times.extend([now] * count)
        except Exception as exc:  # noqa: BLE001 (recorded per request)
            record.error = f"{type(exc).__name__}: {exc}"
        bar.update(1)

    if offsets is not None:
        await asyncio.gather(*(one(i) for i in range(len(specs))))
    else:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(specs)):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                await one(queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
    bar.close()
    return records, loop.time() - start, wall_start


def client_stream(client: Any, run_id: str) -> StreamFn:
    """Streams through ``pdserve.client.AsyncClient`` (greedy, EOS ignored: exact output lengths)."""

    async def stream(i: int, spec: RequestSpec) -> AsyncIterator[int]:
        async for chunk in client.generate_stream(prompt_token_ids=spec.prompt_token_ids, max_tokens=spec.output_len,
                                                  temperature=0.0, ignore_eos=True, request_id=f"{run_id}-{i}"):
            if chunk.token_ids:
                yield len(chunk.token_ids)

    return stream


def stub_stream(tpot_s: float = 0.005, ttft_s: float = 0.02) -> StreamFn:
    """A server-less stream with the given timing: for measuring the client's own capacity."""

    async def stream(i: int, spec: RequestSpec) -> AsyncIterator[int]:
        await asyncio.sleep(ttft_s)
        for _ in range(spec.output_len):
            yield 1
            await asyncio.sleep(tpot_s)

    return stream


async def client_capacity(rate: float, n: int, output_len: int = 32) -> dict[str, float]:
    """Drive ``n`` stub requests at ``rate`` per second; report the client's lag behind its schedule."""
    from benchmarks.serving.workload import poisson_schedule

    specs = [RequestSpec([1], output_len) for _ in range(n)]
    records, duration, _ = await run_schedule(stub_stream(), specs, poisson_schedule(n, rate, seed=1), progress=False)
    lags = sorted(r.lag for r in records)
    return {"rate": rate, "requests": n, "max_lag_s": lags[-1], "p99_lag_s": lags[int(0.99 * (n - 1))],
            "achieved_rate": n / max(r.sent_s for r in records) if n > 1 else rate}

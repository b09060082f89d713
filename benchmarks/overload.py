"""Overload on the CPU demo cluster: N concurrent streams from one async client, how each ended.

    python -m benchmarks.overload --streams 2000

Starts the built-in default cluster (local Ray, tiny model, 1 prefill + 1 decode worker on CPU), opens
``--streams`` greedy streams of ``--max-tokens`` tokens at once, and prints how many were served, how
many failed with which status and whether any failed late (after ``--late-s``), and the growth of this
process's RSS (the router runs in it). The client runs in a process of its own (``--same-process``: in
the router's). A check of behaviour under load, not a performance figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import time
from typing import Any

from pdserve.client import AsyncClient
from pdserve.client.errors import PdserveClientError


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _load(address: str, streams: int, max_tokens: int, late_s: float) -> tuple[collections.Counter, list, float]:
    outcomes: collections.Counter = collections.Counter()
    late: list[tuple[str, float]] = []
    async with AsyncClient(address, max_retries=0, timeout=120) as client:
        async def one(i: int) -> None:
            start = time.monotonic()
            try:
                async for _ in client.generate_stream(f"overload {i}", max_tokens=max_tokens, ignore_eos=True,
                                                      temperature=0.0):
                    pass
                outcomes["served"] += 1
            except PdserveClientError as exc:
                outcomes[exc.code.name] += 1
                if time.monotonic() - start > late_s:
                    late.append((exc.code.name, round(time.monotonic() - start, 1)))

        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(streams)))
        return outcomes, late, time.monotonic() - start


def _load_elsewhere(address: str, streams: int, max_tokens: int, late_s: float, results: Any) -> None:
    results.put(asyncio.run(_load(address, streams, max_tokens, late_s)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--late-s", type=float, default=5.0, help="a failure after this long counts as late")
    parser.add_argument("--same-process", action="store_true",
                        help="run the client in the router's process (by default it has one of its own, as "
                             "clients do; sharing two cores with the router delays the router's answers)")
    args = parser.parse_args()
    from pdserve.cluster.config import ClusterConfig
    from pdserve.cluster.launcher import Cluster
    from pdserve.router.config import RouterConfig

    config = ClusterConfig(router=RouterConfig(host="127.0.0.1", port=0, http_port=None))
    with Cluster(config) as cluster:
        before = _rss_mb()
        if not args.same_process:
            ctx = multiprocessing.get_context("spawn")
            results = ctx.Queue()
            client = ctx.Process(target=_load_elsewhere, args=(cluster.router_address, args.streams, args.max_tokens,
                                                               args.late_s, results))
            client.start()
            outcomes, late, seconds = results.get(timeout=900)
            client.join(60)
        else:
            outcomes, late, seconds = asyncio.run(_load(cluster.router_address, args.streams, args.max_tokens,
                                                        args.late_s))
        after = _rss_mb()
    print(f"{args.streams} streams in {seconds:.1f} s: {dict(outcomes)}; failed late: {len(late)} {late[:5]}; "
          f"router process RSS {before:.0f} -> {after:.0f} MB")


if __name__ == "__main__":
    main()

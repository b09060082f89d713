"""``pdserve serve``: start a cluster from a config file (or the built-in default) and serve until
SIGTERM or Ctrl-C; ``--demo`` sends a few streaming requests through the router, prints them and stops.

Shutdown is graceful: the first SIGTERM/SIGINT stops admission (readiness false, new requests get
UNAVAILABLE) and lets the requests in flight finish for up to ``router.shutdown_grace_s``, then the
cluster stops and the process exits 0; a second signal stops at once. The handlers are installed once
the cluster runs (Ray installs its own while starting, which would otherwise replace them).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from pdserve.common.errors import ConfigError


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="start a cluster (prefill + decode pools and the router) on Ray")
    serve.add_argument("--config", type=Path, help="cluster YAML (default: tiny-random, 1 prefill + 1 decode, CPU); "
                       "environment variables PDSERVE__<SECTION>__<KEY>=<value> override its settings, e.g. "
                       "PDSERVE__DECODE__REPLICAS=4")
    serve.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray instance)")
    serve.add_argument("--port", type=int, help="router gRPC port (overrides router.grpc_port; 0 = any free port)")
    serve.add_argument("--http-port", type=int,
                       help="OpenAI-compatible HTTP API port (overrides router.http_port; 0 = any free port, "
                            "-1 = no HTTP API)")
    serve.add_argument("--demo", action="store_true", help="send a few requests, print them, then stop")


def run_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pdserve.cluster.config import load_cluster_config
    from pdserve.cluster.launcher import Cluster
    from pdserve.rpc.auth import API_KEYS_ENV

    config = load_cluster_config(args.config)  # with the PDSERVE__* environment overrides
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError("--port", f"must be in [0, 65535], got {args.port}")
        config = replace(config, router=replace(config.router, port=args.port))
    if args.http_port is not None:
        if not -1 <= args.http_port <= 65535:
            raise ConfigError("--http-port", f"must be in [0, 65535] or -1 (off), got {args.http_port}")
        config = replace(config, router=replace(config.router, http_port=None if args.http_port < 0 else args.http_port))
    pools = ", ".join(f"{config.pool(r).replicas} {r}" for r in config.roles)
    print(f"pdserve: starting {config.mode} cluster of {config.model!r} ({pools}) ...", file=sys.stderr, flush=True)
    with Cluster(config, address=args.address, log_level=args.log_level.upper()) as cluster:
        address = cluster.router_address
        keyed = bool(config.router.api_keys_file or os.environ.get(API_KEYS_ENV))
        if config.router.host in ("0.0.0.0", "::") and not keyed:
            print(f"pdserve: WARNING: the router listens on every interface ({config.router.host}) with no "
                  f"authentication: anyone who can reach this machine can use it (set router.api_keys_file "
                  f"or {API_KEYS_ENV})", file=sys.stderr, flush=True)
        http = f", {cluster.http_url}/v1 (OpenAI HTTP)" if cluster.http_url else ""
        print(f"pdserve: serving on {address} (gRPC){http}; workers: "
              + ", ".join(f"{w.worker_id}@{w.address}" for w in cluster.workers), flush=True)
        if args.demo:
            return _demo(address)
        print(f"pdserve: try `pdserve generate --target {address} \"Hello\"`; Ctrl-C stops", flush=True)
        signals = [0]

        def on_signal(signum: int, frame: object) -> None:
            # Runs on the main thread between two bytecodes, wherever it is: it takes no lock (a
            # threading.Event here deadlocked when the signal came while the loop below held the
            # Event's own lock), it only counts.
            signals[0] += 1
            if signals[0] > 1:
                raise KeyboardInterrupt  # a second signal: stop now

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        while not signals[0]:
            time.sleep(0.2)
        grace = config.router.shutdown_grace_s
        print(f"pdserve: draining (up to {grace:g} s; a second Ctrl-C stops now) ...", file=sys.stderr, flush=True)
        try:
            finished = cluster.drain()
        except KeyboardInterrupt:
            finished = False
        print("pdserve: stopping" + ("" if finished else " with requests still in flight") + " ...",
              file=sys.stderr, flush=True)
    return 0


def _demo(address: str) -> int:
    from pdserve.client import Client

    with Client(address, timeout=120) as client:
        for prompt in ("Hello from pdserve:", "Disaggregated prefill and decode"):
            print(f"\n>>> {prompt}")
            last = None
            for chunk in client.generate_stream(prompt, max_tokens=32, temperature=0.0):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
            usage = last.usage if last is not None else None
            print(f"\n[finish_reason={last.finish_reason if last else None}, usage={usage}]")
        status = client.cluster_status()
        print(f"\ncluster: {status.mode}, {len(status.workers)} workers healthy: "
              f"{all(w.healthy for w in status.workers)}")
    return 0

"""Helpers for end-to-end tests: start a cluster from a dict config, and offline reference outputs."""

from __future__ import annotations

import time
from typing import Any

from pdserve import LLM, SamplingParams
from pdserve.cluster.config import cluster_config_from_dict
from pdserve.cluster.launcher import Cluster

ENGINE = {"block_size": 16, "max_model_len": 512, "num_kv_blocks": 1024}


def start_cluster(mode: str, prefill: int = 1, decode: int = 1, colocated: int = 2,
                  pool_engines: dict[str, dict[str, Any]] | None = None,
                  pool_settings: dict[str, dict[str, Any]] | None = None, **overrides: Any) -> Cluster:
    """A cluster of the tiny model; ``pool_engines`` adds engine settings per pool (``{"decode": {...}}``),
    ``pool_settings`` the pool's own keys (``{"decode": {"tensor_parallel_size": 2}}``)."""
    config: dict[str, Any] = {
        "model": "tiny-random", "mode": mode, "engine": dict(ENGINE),
        "prefill": {"replicas": prefill, "max_batch_tokens": 256},
        "decode": {"replicas": decode, "max_running_requests": 64},
        "colocated": {"replicas": colocated, "max_batch_tokens": 256, "max_running_requests": 64},
        "router": {"grpc_port": 0, "request_timeout_s": 60},
        "kv_transfer": {"backend": "auto", "timeout_s": 30},
        **overrides,
    }
    if mode != "colocated":
        config.pop("colocated")
    for role, engine in (pool_engines or {}).items():
        config[role]["engine"] = engine
    for role, settings in (pool_settings or {}).items():
        config[role].update(settings)
    cluster = Cluster(cluster_config_from_dict(config))
    cluster.start()
    return cluster


def offline(prompts: list[str], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    llm = LLM(model="tiny-random", **ENGINE, max_num_batched_tokens=256)
    return [o.token_ids for o in llm.generate(prompts, params)]


def wait_until_idle(cluster: Cluster, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Poll worker stats until no worker holds a request or a block; return the last stats."""
    end = time.monotonic() + timeout
    while True:
        stats = cluster.worker_stats()
        idle = all(s["unfinished"] == 0 and s["held"] == 0 and s["free_blocks"] == s["usable_blocks"]
                   and s.get("transfers_in_flight", 0) == 0 for s in stats)
        if idle or time.monotonic() > end:
            return stats
        time.sleep(0.1)

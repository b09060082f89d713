"""The Grafana dashboard under deploy/ queries only series the router exports, with their labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pdserve.router.config import WorkerEndpoint, WorkerRole
from pdserve.router.metrics import RouterMetrics
from pdserve.router.registry import WorkerState

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve-dashboard.json"
SERIES = re.compile(r"\b((?:vllm|pdserve):[a-z0-9_]+)")


def _exported() -> dict[str, set[str]]:
    """Every series name the router serves (after one request and with a GPU worker's telemetry), with
    the label names it carries."""
    metrics = RouterMetrics("m")
    metrics.placed(remote_prefill=True)
    metrics.rejected("ttft")
    metrics.stream_moved()
    metrics.first_token(0.1)
    metrics.token_gap(0.01)
    metrics.ended("finished", "length", 1.0, 10, 5, 0.1)
    metrics.ended("error", "", 1.0, 10, 0, None)
    worker = WorkerState(endpoint=WorkerEndpoint("d0", WorkerRole.DECODE, "10.0.0.1:7000"), healthy=True)
    steps = {"decode": {"count": 1, "seconds": 0.01}}
    snapshot = {"engine": {"running_requests": 1, "waiting_requests": 0, "kv_usage": 0.1, "num_kv_blocks": 10,
                           "preemptions": 0, "prompt_tokens_computed": 0, "prefix_cache_queries": 0,
                           "prefix_cache_hits": 0, "steps": steps},
                "kv_transfer": {"transport": "nccl", "received": 1, "failures": 0, "local_recomputes": 0,
                                "bytes": 100, "seconds": 0.1, "sent": 1},
                "gpu": {"available": True, "utilization": 50, "memory_used_bytes": 1, "memory_total_bytes": 2,
                        "power_watts": 100.0, "sm_clock_mhz": 1980, "nvlink_tx_bytes": 1, "nvlink_rx_bytes": 1}}
    metrics.attach(lambda: [worker], lambda: {"d0": snapshot})
    out: dict[str, set[str]] = {}
    for line in metrics.render(0).splitlines():
        if line and not line.startswith("#"):
            name, _, labels = line.partition("{")
            out.setdefault(name, set()).update(re.findall(r'(\w+)="', labels.split("}")[0]))
    return out


def test_every_query_names_an_exported_series_and_its_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported()
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(queries) >= 20
    used = set()
    for query in queries:
        for name in SERIES.findall(query):
            assert name in exported, f"{name} (in {query!r}) is not a series the router exports"
            used.add(name)
        for label in re.findall(r"by \(([^)]*)\)", query):
            for name in SERIES.findall(query):
                if name in exported:
                    missing = {x.strip() for x in label.split(",")} - exported[name] - {"le"}
                    assert not missing or name.endswith("_bucket"), (query, missing)
    # the panels the operator needs: latency, throughput, per-worker load, sizing, KV transfer, GPU
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:kv_cache_usage_perc", "pdserve:engine_step_seconds_total", "pdserve:prefill_tokens_per_second",
                 "pdserve:kv_transfer_bytes_total", "pdserve:gpu_utilization_percent"):
        assert name in used, name

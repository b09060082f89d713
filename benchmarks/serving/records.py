"""Where a serving run's data goes on disk: each finished point as it ends (``serve-partial.jsonl``, so a
failure later in the run loses nothing), and every request's timings in a compressed file of their own."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS


def checkpoint_point(kind: str, workload: str, points: list[dict[str, Any]]) -> None:
    """Keep every finished point on disk, so a failure later in the run loses nothing."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "serve-partial.jsonl").open("a") as f:
        f.write(json.dumps({"config": kind, "workload": workload, "point": points[-1]}) + "\n")


def write_records(all_results: dict[str, Any], path: Path) -> None:
    """Every request's timings, compressed, in their own file (the summary file stays small); the
    points keep a count."""
    records = {}
    for kind, res in all_results.items():
        for workload, points in res["workloads"].items():
            for point in points:
                records[f"{kind}/{workload}/{point['run_id']}"] = point.pop("records", [])
                point["num_records"] = len(records[f"{kind}/{workload}/{point['run_id']}"])
    with gzip.open(path, "wt") as f:
        json.dump(_rounded(records), f, separators=(",", ":"))


def _rounded(value: Any) -> Any:
    """``value`` with every float rounded to 10 us (the request files get about half as large)."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value

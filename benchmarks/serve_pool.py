"""Pool the serving benchmark over seeds: per configuration, workload and SLO, the goodput of each seed,
their spread, and the goodput of the attainment pooled over seeds (every seed has the same number of
requests per point, so the mean attainment is the attainment of the pooled requests).

    python -m benchmarks.serve_pool benchmarks/results/serve-s0-h200x2.json serve-s1-... --out serve-pooled
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, write_results
from benchmarks.serving.metrics import goodput


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    per_seed: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for run in runs:
        for row in run["goodput"]:
            per_seed[(row["config"], row["workload"], row["slo"])].append(row["goodput_per_gpu"])
    attainments: dict[tuple[str, str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    requests: dict[tuple[str, str, float], int] = defaultdict(int)
    for run in runs:
        for kind, res in run["results"].items():
            for workload, points in res["workloads"].items():
                if workload == "trace":
                    continue
                for p in points:
                    requests[(kind, workload, p["rate_per_gpu"])] += p["requests"]
                    for slo, value in p["slo_attainment"].items():
                        attainments[(kind, workload, slo)][p["rate_per_gpu"]].append(value)
    rows = []
    for key, by_rate in attainments.items():
        pooled = {rate: sum(v) / len(v) for rate, v in by_rate.items()}
        seeds = per_seed.get(key, [])
        rows.append({"config": key[0], "workload": key[1], "slo": key[2], "seeds": len(seeds),
                     "goodput_per_seed": seeds, "goodput_min": min(seeds, default=None),
                     "goodput_max": max(seeds, default=None),
                     "goodput_mean": round(sum(seeds) / len(seeds), 2) if seeds else None,
                     "goodput_pooled": round(goodput(sorted(pooled.items())), 2),
                     "pooled_attainment": {str(r): round(a, 3) for r, a in sorted(pooled.items())},
                     "requests_per_rate": {str(r): requests[(key[0], key[1], r)] for r in sorted(pooled)}})
    return {"commits": sorted({r["run"]["commit"] for r in runs}), "rows": rows}


def render(payload: dict[str, Any], info: dict[str, Any]) -> str:
    table = [[r["config"], r["workload"], r["slo"], r["goodput_pooled"], r["goodput_mean"],
              f"{r['goodput_min']}-{r['goodput_max']}", " ".join(str(g) for g in r["goodput_per_seed"]),
              " / ".join(f"{k}: {v}" for k, v in r["pooled_attainment"].items()),
              max(r["requests_per_rate"].values(), default=0)] for r in payload["rows"]]
    return "\n".join([
        "# Serving benchmark pooled over seeds", "",
        f"{info.get('device')} x{info.get('num_gpus')} · commit(s) {', '.join(payload['commits'])} · {info['date']}", "",
        "Goodput: req/s per GPU with >= 90% of requests meeting both SLOs (interpolated between swept rates).", "",
        markdown_table(["config", "workload", "SLO", "goodput (pooled attainment)", "mean of seeds", "seed range",
                        "per seed", "pooled attainment by rate/GPU", "requests per rate"], table), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", default="serve-pooled")
    args = parser.parse_args()
    runs = [json.loads(f.read_text()) for f in args.files]
    payload = pool(runs)
    info = dict(runs[0]["run"])
    markdown = render(payload, info)
    print(markdown)
    write_results(args.out, info, {"sources": [f.name for f in args.files], **payload}, markdown)


if __name__ == "__main__":
    main()

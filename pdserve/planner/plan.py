"""``pdserve plan``: for a workload, SLOs, a GPU count and a step-time profile, predict every
configuration worth running (colocated with SLO-budgeted steps, and every xPyD split) by simulation
(:mod:`pdserve.planner.simulate`), and recommend the one with the most goodput per GPU.

Goodput is the highest request rate at which at least ``target`` (0.9) of the requests meet both SLOs,
found by bisection on the arrival rate (for a trace: a factor on its arrival rate), divided by the GPU
count. The profile is the JSON ``pdserve profile`` writes (the step-time model under ``model``, and
``kv_bytes_per_token``); a bare step-time model works too, with the transfer defaults below.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.common.config import DEFAULT_GRAPH_MAX_TOKENS, EngineConfig
from pdserve.common.errors import ConfigError
from pdserve.common.graph_sizes import capture_sizes
from pdserve.common.mooncake_trace import TRACE_BLOCK_TOKENS, TraceArrivals, TraceError, read_trace
from pdserve.common.step_model import StepKind, StepShape, StepTimeModel, read_profile
from pdserve.planner.simulate import ClusterSimulation, SimOutcome, SimRequest, WorkerSpec

DEFAULT_KV_BYTES_PER_TOKEN = 131072.0  # Llama-3.1-8B in bf16: 32 layers x 2 x 8 heads x 128 x 2 bytes
DEFAULT_TRANSFER_BYTES_PER_S = 50e9
MAX_SCALE = 64.0  # the goodput search stops at 64x the workload's own rate
SOLO_PREFILL_CHUNK = 8192  # an idle worker's prefill step (the engines' default token budget)


@dataclass(frozen=True)
class Profile:
    model: StepTimeModel
    kv_bytes_per_token: float = DEFAULT_KV_BYTES_PER_TOKEN
    transfer_bytes_per_s: float = DEFAULT_TRANSFER_BYTES_PER_S
    kv_capacity_tokens: int | None = None  # one worker's KV cache in tokens (None: not limited)
    # rows its engine's CUDA graphs compute, ascending (empty: no graphs): a budget-cut chunk fills them
    graph_rows: tuple[int, ...] = ()

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_dict(read_profile(path, "profile"), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> Profile:
        """A profile file's contents (``model``, or a bare step-time model, plus the KV figures), and the
        live ``calibration`` per kind of step when present (``to_dict`` writes it; profile files don't)."""
        model = StepTimeModel.from_dict(data.get("model", data), source)
        if data.get("calibration"):
            model = model.calibrated({StepKind(kind): float(f) for kind, f in data["calibration"].items()})
        capacity = data.get("kv_capacity_tokens")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ConfigError("profile", f"{source}: kv_capacity_tokens must be a positive integer, got {capacity!r}")
        return cls(model, float(data.get("kv_bytes_per_token", DEFAULT_KV_BYTES_PER_TOKEN)),
                   float(data.get("kv_transfer_bytes_per_s", DEFAULT_TRANSFER_BYTES_PER_S)), capacity,
                   _graph_rows(data, source))

    def to_dict(self) -> dict[str, Any]:
        """What ``from_dict`` reads back: the profile file's fields plus the calibration."""
        return {"model": self.model.to_dict(), "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_transfer_bytes_per_s": self.transfer_bytes_per_s, "kv_capacity_tokens": self.kv_capacity_tokens,
                "graph_rows": list(self.graph_rows),
                "calibration": {kind.value: factor for kind, factor in self.model.calibration}}


def _graph_rows(data: dict[str, Any], source: str) -> tuple[int, ...]:
    """A profile's ``graph_rows`` (``pdserve profile`` records the engine's since 2026-12-02); a GPU
    profile written before then gets the engine's default graphs (one GPU: up to 1,024 tokens, 256
    sequences), a CPU one none."""
    rows = data.get("graph_rows")
    if rows is None:
        engine = data.get("engine")
        on_gpu = isinstance(engine, dict) and str(engine.get("device", "")).startswith("cuda")
        return tuple(capture_sizes(EngineConfig.max_num_seqs, DEFAULT_GRAPH_MAX_TOKENS)) if on_gpu else ()
    if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in rows) \
            or rows != sorted(set(rows)):
        raise ConfigError("profile", f"{source}: graph_rows must be ascending distinct positive integers, got {rows!r}")
    return tuple(rows)


@dataclass(frozen=True)
class Workload:
    """Requests at a base rate; ``at(scale)`` gives them at ``scale`` times that rate."""

    requests: tuple[SimRequest, ...]
    name: str

    @property
    def rate(self) -> float:
        span = self.requests[-1].arrival_s - self.requests[0].arrival_s if len(self.requests) > 1 else 0.0
        return (len(self.requests) - 1) / span if span > 0 else 0.0

    @property
    def span_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    def at(self, scale: float) -> list[SimRequest]:
        """The requests at ``scale`` times the rate over the same window (``span_s``): the workload is
        repeated back to back and its time compressed, so an overloaded configuration shows a growing
        queue rather than a short burst it could clear."""
        span = self.span_s
        period = span + (span / max(1, len(self.requests) - 1))
        out: list[SimRequest] = []
        for copy in range(max(1, math.ceil(scale))):
            for r in self.requests:
                t = (r.arrival_s - self.requests[0].arrival_s + copy * period) / scale
                if t <= span:
                    out.append(replace(r, arrival_s=t))
        return sorted(out, key=lambda r: r.arrival_s)

    @classmethod
    def poisson(cls, rate: float, prompt_tokens: int, output_tokens: int, n: int = 400, seed: int = 0) -> Workload:
        rng = random.Random(seed)
        t, out = 0.0, []
        for _ in range(n):
            t += rng.expovariate(rate)
            out.append(SimRequest(t, prompt_tokens, output_tokens))
        return cls(tuple(out), f"poisson {rate:g}/s, {prompt_tokens} in / {output_tokens} out")

    @classmethod
    def trace(cls, path: str | Path, *, start: int = 0, count: int = 400, time_scale: float = 1.0,
              length_scale: float = 1.0, max_prompt: int = 32768, arrivals: TraceArrivals = TraceArrivals.SPREAD,
              seed: int = 0) -> Workload:
        """A Mooncake-format JSONL trace window (:func:`pdserve.common.mooncake_trace.read_trace`: ``arrivals``
        and ``seed`` say how its bucketed timestamps are replayed). Prompt lengths and the blocks of their
        ``hash_ids`` (which the simulation's prefix caches match) are ``x length_scale``; outputs as recorded."""
        if not time_scale > 0 or not length_scale > 0:
            raise ConfigError("trace", f"time and length scales must be > 0, got {time_scale} and {length_scale}")
        try:
            rows = read_trace(path, start=start, count=count, arrivals=arrivals, seed=seed)
        except TraceError as exc:
            raise ConfigError("trace", str(exc)) from None
        if len(rows) < 2:
            raise ConfigError("trace", f"{path}: fewer than two requests from line {start + 1}")
        block = max(1, round(TRACE_BLOCK_TOKENS * length_scale))
        return cls(tuple(SimRequest(r.arrival_s * time_scale, max(1, min(max_prompt, int(r.input_length * length_scale))),
                                    max(1, r.output_length), r.hash_ids, block if r.hash_ids else 0) for r in rows),
                   f"trace {Path(path).name}" + (" (recorded arrivals)" if arrivals is TraceArrivals.RECORDED else ""))


@dataclass(frozen=True)
class Prediction:
    config: str
    num_gpus: int
    goodput_per_gpu: float  # req/s per GPU at >= target attainment
    goodput_at_search_limit: bool  # the search stopped at MAX_SCALE x the offered rate: "at least" this
    attainment_at_offered: float
    ttft_p90_s: float | None
    tpot_p90_s: float | None
    preemptions_per_request: float = 0.0  # at the offered rate (a worker's KV cache ran out of blocks)
    dropped_share: float = 0.0  # at the offered rate: requests no worker could fit


def configuration_name(*, colocated: int = 0, prefill: int = 0, decode: int = 0) -> str:
    """How the planner (and the router, for its own cluster) names a configuration: ``colocated xN``,
    ``xPyD``, or for a split cluster holding colocated workers too ``xPyD+zC`` (which the planner does not
    plan, and its ``apply`` mode leaves as it is)."""
    if colocated and (prefill or decode):
        return f"{prefill}P{decode}D+{colocated}C"
    return f"colocated x{colocated}" if colocated else f"{prefill}P{decode}D"


def configurations(num_gpus: int) -> list[tuple[str, dict[str, int]]]:
    """Colocated on every GPU, and every split into prefill and decode workers."""
    counts = [{"colocated": num_gpus}] + [{"prefill": p, "decode": num_gpus - p} for p in range(1, num_gpus)]
    return [(configuration_name(**c), c) for c in counts]


def _p90(values: Sequence[float]) -> float | None:
    s = sorted(values)
    return s[min(len(s) - 1, int(0.9 * len(s)))] if s else None


def attainment(outcomes: Sequence[SimOutcome], ttft_slo_s: float, tpot_slo_s: float) -> float:
    return sum(o.meets(ttft_slo_s, tpot_slo_s) for o in outcomes) / len(outcomes) if outcomes else 0.0


#: Prompt tokens per step of the prefill pool that pdserve ships with SLOs set (``auto``,
#: ``deploy/cluster-2gpu-1p1d.yaml``). A prefill worker's steps of 2,048 tokens already run near the GPU's
#: prompt throughput, and every prompt of a step finishes with the step: 8,192-token steps made each
#: prompt wait for three others. On 2xH200 (``serve-s2k``): trace attainment 0.27 -> 0.35 at TPOT 25 ms,
#: prefill-heavy at 12 req/s per GPU 0.75 -> 0.97 at TPOT 10 ms.
SLO_PREFILL_STEP_TOKENS = 2048


def simulation(profile: Profile, counts: dict[str, int], *, ttft_slo_s: float, tpot_slo_s: float,
               colocated_spec: WorkerSpec | None = None, spill: bool = True, budget_window: int = 0,
               defer_below: int = 0, borrow_tokens: int = 0) -> ClusterSimulation:
    """A fresh simulation of one configuration as :func:`predict` runs it (see there). ``budget_window``,
    ``defer_below`` and ``borrow_tokens``: the engines' ``step_budget_window``, ``defer_chunks_below`` and
    ``step_budget_borrow_tokens`` on the workers that budget their steps (also applied to a given
    ``colocated_spec`` that budgets)."""
    def budgeted(spec: WorkerSpec) -> WorkerSpec:
        return replace(spec, budget_window=budget_window, defer_below=defer_below, borrow_tokens=borrow_tokens,
                       ttft_slo_s=ttft_slo_s, graph_rows=profile.graph_rows)

    spec = colocated_spec or WorkerSpec(step_budget_s=tpot_slo_s)
    if spec.step_budget_s is not None:
        spec = budgeted(spec)
    decode_spec = (budgeted(WorkerSpec(max_batch_tokens=2048, step_budget_s=tpot_slo_s)) if spill
                   else WorkerSpec(max_batch_tokens=2048))
    # with an SLO every worker of the cluster orders its prompts by deadline, prefill workers too
    prefill_spec = (WorkerSpec(max_batch_tokens=SLO_PREFILL_STEP_TOKENS, ttft_slo_s=ttft_slo_s) if spill
                    else WorkerSpec())
    if profile.kv_capacity_tokens is not None:
        spec, decode_spec, prefill_spec = (replace(s, kv_capacity_tokens=profile.kv_capacity_tokens)
                                           for s in (spec, decode_spec, prefill_spec))
    return ClusterSimulation(profile.model, colocated=counts.get("colocated", 0), prefill=counts.get("prefill", 0),
                             decode=counts.get("decode", 0), colocated_spec=spec, decode_spec=decode_spec,
                             prefill_spec=prefill_spec,
                             spill_ttft_s=ttft_slo_s if spill else None, kv_bytes_per_token=profile.kv_bytes_per_token,
                             transfer_bytes_per_s=profile.transfer_bytes_per_s)


def predict(profile: Profile, workload: Workload, counts: dict[str, int], *, ttft_slo_s: float, tpot_slo_s: float,
            target: float = 0.9, name: str = "", colocated_spec: WorkerSpec | None = None,
            spill: bool = True, budget_window: int = 0, defer_below: int = 0, borrow_tokens: int = 0,
            num_gpus: int | None = None, budget_tpot_s: float | None = None) -> Prediction:
    """Simulate one configuration at the offered rate, then bisect the rate for its goodput. Colocated
    workers budget their steps to the TPOT SLO unless ``colocated_spec`` says otherwise; split pools
    run as pdserve runs them with SLOs set (``spill``): decode workers budget their steps to the TPOT
    SLO and take the prompts the prefill pool would answer too late. ``num_gpus``: the GPUs the workers
    hold (default: one each; tensor-parallel workers hold more), which goodput per GPU divides by.
    ``budget_tpot_s``: the TPOT SLO the budgeting workers are set up for, when not the one scored (a
    cluster set up for 15 ms, scored at 10)."""
    policy: dict[str, Any] = {"colocated_spec": colocated_spec, "spill": spill, "budget_window": budget_window,
                              "defer_below": defer_below, "borrow_tokens": borrow_tokens}
    at_offered = simulation(profile, counts, ttft_slo_s=ttft_slo_s, tpot_slo_s=budget_tpot_s or tpot_slo_s,
                            **policy)  # kept: its preemption and drop counts go into the prediction
    offered = at_offered.run(workload.at(1.0))
    num_gpus = num_gpus or sum(counts.values())
    meets: Callable[[float], bool] = lambda scale: attainment_at(  # noqa: E731
        profile, workload, counts, scale, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s,
        budget_tpot_s=budget_tpot_s, **policy) >= target
    lo, hi = 0.0, 1.0
    while meets(hi) and hi < MAX_SCALE:
        lo, hi = hi, hi * 2
    if lo == 0.0 and not meets(1 / 64):
        best = 0.0
    else:
        lo = max(lo, 1 / 64)
        for _ in range(10):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if meets(mid) else (lo, mid)
        best = lo
    return Prediction(name or "+".join(f"{v} {k}" for k, v in counts.items()), num_gpus,
                      round(best * workload.rate / num_gpus, 3), best >= MAX_SCALE,
                      round(attainment(offered, ttft_slo_s, tpot_slo_s), 3),
                      _p90([o.ttft_s for o in offered if o.ttft_s is not None]),
                      _p90([o.tpot_s for o in offered if o.tpot_s is not None]),
                      round(at_offered.num_preempted / max(len(offered), 1), 3),
                      round(at_offered.num_dropped / max(len(offered), 1), 3))


def attainment_at(profile: Profile, workload: Workload, counts: dict[str, int], scale: float, *, ttft_slo_s: float,
                  tpot_slo_s: float, budget_tpot_s: float | None = None, **policy: Any) -> float:
    """The share of ``workload`` at ``scale`` times its rate that one configuration serves within both SLOs
    (``policy``: :func:`simulation`'s engine options; ``budget_tpot_s`` as in :func:`predict`)."""
    cluster = simulation(profile, counts, ttft_slo_s=ttft_slo_s, tpot_slo_s=budget_tpot_s or tpot_slo_s, **policy)
    return attainment(cluster.run(workload.at(scale)), ttft_slo_s, tpot_slo_s)


def attainment_curve(profile: Profile, workload: Workload, counts: dict[str, int], rates_per_gpu: Sequence[float], *,
                     ttft_slo_s: float, tpot_slo_s: float, num_gpus: int | None = None,
                     borrow_tokens: int = 0) -> list[tuple[float, float]]:
    """SLO attainment of one configuration at each offered rate per GPU: the curve :func:`predict` bisects
    for its goodput (the same simulation, so the curve is at or above ``target`` at the goodput's rate)."""
    num_gpus = num_gpus or sum(counts.values())
    return [(round(rate, 4), round(attainment_at(profile, workload, counts, rate * num_gpus / workload.rate,
                                                 ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s,
                                                 borrow_tokens=borrow_tokens), 3))
            for rate in rates_per_gpu]


def curve_rates(offered_per_gpu: float, goodputs: Sequence[float], points: int) -> list[float]:
    """The rates per GPU a plot's curves are simulated at: ``points`` evenly spaced from a tenth of the
    offered rate to past both the offered rate and the best goodput, plus each goodput itself."""
    top = max([2.0 * offered_per_gpu, *(1.25 * g for g in goodputs)])
    grid = [top * (i + 1) / points for i in range(points)]
    return sorted({round(r, 4) for r in [offered_per_gpu / 10, *grid, *(g for g in goodputs if g > 0)]})


def solo_prefill_s(model: StepTimeModel, prompt_tokens: int, chunk: int = SOLO_PREFILL_CHUNK) -> float:
    """How long ``prompt_tokens`` take to prefill alone on an idle GPU, in steps of ``chunk`` tokens."""
    seconds, done = 0.0, 0
    while done < prompt_tokens:
        n = min(chunk, prompt_tokens - done)
        seconds += model.predict(StepShape(0).plus_chunk(n, done))
        done += n
    return seconds


def out_of_reach_share(model: StepTimeModel, workload: Workload, ttft_slo_s: float) -> float:
    """The share of the workload's requests whose prompt alone, on an idle GPU, takes longer than the TTFT
    SLO: no configuration serves those in time (more than 1 - target of them: every goodput is 0)."""
    late = sum(solo_prefill_s(model, r.prompt_tokens) > ttft_slo_s for r in workload.requests)
    return late / len(workload.requests) if workload.requests else 0.0


def plan(profile: Profile, workload: Workload, num_gpus: int, *, ttft_slo_s: float, tpot_slo_s: float,
         num_workers: int | None = None, borrow_tokens: int = 0, curve_points: int = 0) -> dict[str, Any]:
    """Every configuration of ``num_workers`` workers (default: one per GPU) holding ``num_gpus`` GPUs in
    all (tensor-parallel workers hold several; ``profile`` is then one such worker's), predicted and ranked
    by goodput per GPU; moving a worker between pools keeps its GPUs, so every configuration has them all.
    ``borrow_tokens``: the workers' ``step_budget_borrow_tokens``. ``curve_points`` > 0 adds ``curves``:
    each configuration's attainment against the offered rate per GPU (:func:`curve_rates`), for a plot."""
    workers = num_workers or num_gpus
    configs = configurations(workers)
    predictions = [predict(profile, workload, counts, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s, name=name,
                           num_gpus=num_gpus, borrow_tokens=borrow_tokens) for name, counts in configs]
    best = max(predictions, key=lambda p: (p.goodput_per_gpu, p.attainment_at_offered))
    result = {"workload": workload.name, "offered_rate": round(workload.rate, 3), "num_gpus": num_gpus,
              "num_workers": workers,
              "slo": {"ttft_ms": ttft_slo_s * 1e3, "tpot_ms": tpot_slo_s * 1e3},
              "calibration": {kind.value: round(profile.model.factor(kind), 3) for kind in StepKind},
              "kv_transfer_gb_per_s": float(f"{profile.transfer_bytes_per_s / 1e9:.4g}"),
              "out_of_reach_share": round(out_of_reach_share(profile.model, workload, ttft_slo_s), 3),
              "predictions": [asdict(p) for p in predictions], "recommended": best.config}
    if curve_points > 0:
        rates = curve_rates(workload.rate / num_gpus, [p.goodput_per_gpu for p in predictions], curve_points)
        result["curves"] = {name: attainment_curve(profile, workload, counts, rates, ttft_slo_s=ttft_slo_s,
                                                   tpot_slo_s=tpot_slo_s, num_gpus=num_gpus,
                                                   borrow_tokens=borrow_tokens)
                            for name, counts in configs}
    return result


def render(result: dict[str, Any]) -> str:
    workers = result.get("num_workers", result["num_gpus"])
    held = "" if workers == result["num_gpus"] else f" ({workers} workers)"
    rows = [f"pdserve plan: {result['workload']} (offered {result['offered_rate']:g} req/s) on {result['num_gpus']} "
            f"GPUs{held}, TTFT <= {result['slo']['ttft_ms']:g} ms, TPOT <= {result['slo']['tpot_ms']:g} ms",
            "step times x " + ", ".join(f"{k} {v:g}" for k, v in result.get("calibration", {}).items())
            + (f"; KV link {result['kv_transfer_gb_per_s']:g} GB/s" if "kv_transfer_gb_per_s" in result else ""), "",
            f"{'configuration':<16} {'goodput/GPU':>12} {'attain@offered':>15} {'TTFT p90 ms':>12} {'TPOT p90 ms':>12}"]
    for p in result["predictions"]:
        mark = "  <- recommended" if p["config"] == result["recommended"] else ""
        ttft = "-" if p["ttft_p90_s"] is None else f"{p['ttft_p90_s'] * 1e3:.1f}"
        tpot = "-" if p["tpot_p90_s"] is None else f"{p['tpot_p90_s'] * 1e3:.1f}"
        goodput = (">= " if p["goodput_at_search_limit"] else "") + f"{p['goodput_per_gpu']:.3f}"
        rows.append(f"{p['config']:<16} {goodput:>12} {p['attainment_at_offered']:>15.3f} "
                    f"{ttft:>12} {tpot:>12}{mark}")
    short = [p for p in result["predictions"] if p.get("preemptions_per_request") or p.get("dropped_share")]
    if short:
        rows += ["", "KV cache short at the offered rate: " + "; ".join(
            f"{p['config']} preempts {p['preemptions_per_request']:g} times per request"
            + (f" and cannot fit {p['dropped_share']:.1%} of them" if p["dropped_share"] else "") for p in short)]
    share = result.get("out_of_reach_share", 0.0)
    if share > 0:
        rows += ["", f"note: {share:.1%} of the requests cannot meet TTFT <= {result['slo']['ttft_ms']:g} ms even alone "
                 f"on an idle GPU (their prompts take longer to prefill)"
                 + ("; above 10%, no configuration reaches the 90% goodput line" if share > 0.1 else "")]
    return "\n".join(rows)

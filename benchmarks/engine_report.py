"""The engine benchmark's report: the engine issue's targets, and the markdown of a run."""

from __future__ import annotations

from typing import Any

from benchmarks.common import markdown_table


def evaluate_targets(decode, prefill, offline, hf, startup, latency, mixed) -> dict[str, Any]:  # noqa: ANN001
    """The targets of the engine issue (one H200, Llama-3.1-8B shapes, bf16)."""
    def find(rows, **kw):  # noqa: ANN001, ANN202
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), {})

    def target(goal: float, value: float | None, at_most: bool = False, **extra: Any) -> dict[str, Any]:
        ok = value is not None and (value <= goal if at_most else value >= goal)
        return {"target": goal, "value": value, "pass": ok, **extra}

    out = {}
    b1 = find(decode, batch=1, context=1024).get("step_ms")
    for n in (16, 64, 128):
        ms = find(latency, prompt_tokens=n).get("best_ms")
        out[f"prefill_{n}_vs_b1_decode_step"] = target(1.5, round(ms / b1, 2) if ms and b1 else None, at_most=True,
                                                       prefill_ms=ms, decode_step_ms=b1)
    out["prefill_512_ms"] = target(12.0, find(latency, prompt_tokens=512).get("best_ms"), at_most=True)
    r = find(mixed, mode="graphs", decode_batch=64, chunk_tokens=256)
    out["mixed_b64_256_vs_decode"] = target(1.3, r.get("ratio"), at_most=True, mixed_ms=r.get("mixed_ms"),
                                            decode_ms=r.get("decode_ms"))
    for batch, goal in ((1, 0.85), (64, 0.80)):
        r = find(decode, batch=batch, context=1024)
        out[f"decode_bw_util_b{batch}_1k"] = target(goal, r.get("bw_util_step"), forward_value=r.get("bw_util_forward"))
    out["offline_output_tok_s"] = target(11000.0, offline.get("output_tokens_per_s"))
    ratio = None
    if hf.get("output_tokens_per_s") and offline.get("output_tokens_per_s"):
        ratio = round(offline["output_tokens_per_s"] / hf["output_tokens_per_s"], 1)
    out["offline_vs_transformers"] = target(10.0, ratio)
    for case in ("1x2048", "1x8192"):
        out[f"prefill_mfu_{case}"] = target(0.78, find(prefill, case=case).get("mfu_step"))
    out["startup_s"] = target(30.0, startup["total_s"], at_most=True)
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(not run)\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return markdown_table(keys, [[r.get(k, "") for k in keys] for r in rows])


def render_markdown(info: dict[str, Any], p: dict[str, Any]) -> str:
    lines = [f"# Engine benchmark ({p['preset']})", "",
             f"{info.get('device')} · commit {info['commit']} · {info['date']} · torch {info['torch']}"
             f" · triton {info.get('triton', '-')}", "",
             f"Ceilings measured in this run: copy {p['ceilings'].get('copy_gb_per_s')} GB/s (read+write), "
             f"bf16 matmul {p['ceilings'].get('bf16_matmul_tflops')} TFLOP/s.", "",
             f"Start-up: {p['startup']}", "", "## Targets", ""]
    if p["targets"]:
        lines.append(markdown_table(["target", "goal", "measured", "pass"],
                                    [[k, v["target"], v["value"], "PASS" if v["pass"] else "FAIL"]
                                     for k, v in p["targets"].items()]))
    lines += ["## Decode (engine step vs forward pass)", "",
              markdown_table(["batch", "context", "step ms", "forward ms", "GB moved", "util (step)", "util (fwd)",
                              "tok/s"],
                             [[r["batch"], r["context"], r.get("step_ms", r.get("skipped")), r.get("forward_ms", ""),
                               r.get("bytes_gb", ""), r.get("bw_util_step", ""), r.get("bw_util_forward", ""),
                               r.get("tokens_per_s", "")] for r in p["decode"]]),
              "## Prefill", "",
              markdown_table(["case", "tokens", "step ms", "forward ms", "TFLOP/s", "MFU (step)", "MFU (fwd)"],
                             [[r["case"], r["tokens"], r["step_ms"], r["forward_ms"], r["tflops_step"],
                               r.get("mfu_step", ""), r.get("mfu_forward", "")] for r in p["prefill"]]),
              "## Prefill latency by prompt length (LLM.generate, max_tokens=1)", "",
              _table(p["prefill_latency"]),
              "## Mixed steps: a decode batch (1k context) plus one prefill chunk, device span of the step", "",
              _table(p["mixed_steps"]),
              "## Inter-token latency of 32 decodes while a 2k prompt is chunked in", "",
              _table(p["chunked_prefill_itl"]),
              "## Offline throughput", "", f"pdserve: {p['offline']}", "", f"transformers CB: {p['transformers_cb']}",
              ""]
    if p["attention_kernels"]:
        lines += ["## Prefill attention kernel vs torch SDPA", "",
                  markdown_table(list(p["attention_kernels"][0]), [list(r.values()) for r in p["attention_kernels"]])]
    if p["decode_profile_b1"]:
        lines += ["## Profile: batch-1 decode step, top kernels", "",
                  markdown_table(list(p["decode_profile_b1"][0]), [list(r.values()) for r in p["decode_profile_b1"]])]
    return "\n".join(lines)

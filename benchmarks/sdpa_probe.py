"""What a prompt of a new length costs in torch's fused attention, per SDPA backend.

The engine runs context-free prefill chunks through ``scaled_dot_product_attention`` in eager steps.
Some backends build a plan per shape on first use (cuDNN), which stalls the engine thread the first
time each prompt length is seen; others do not, but may be slower. For each backend this probe times
the first call at a series of never-seen lengths, the repeat call, and the steady speed at 2k and 8k
tokens (Llama-3.1-8B heads: 32 query heads, 8 KV heads, head dim 128, bf16, causal).

    python -m benchmarks.sdpa_probe
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import markdown_table, run_info, write_results

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(n, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(0, 1).unsqueeze(0)
    k = torch.randn(n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(0, 1).unsqueeze(0)
    v = torch.randn(n, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(0, 1).unsqueeze(0)
    return q, k, v


def _call_ms(backend: SDPBackend | None, n: int) -> float:
    q, k, v = _inputs(n)
    torch.cuda.synchronize()
    start = time.perf_counter()
    if backend is None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def probe(name: str, backend: SDPBackend | None, offset: int) -> dict[str, Any]:
    lengths = [1000 + offset, 2040 + offset, 3001 + offset, 777 + offset, 4500 + offset]
    try:
        first = [round(_call_ms(backend, n), 2) for n in lengths]
        again = [round(_call_ms(backend, n), 2) for n in lengths]
        speed = {}
        for n in (2048, 8192):
            _call_ms(backend, n)
            ms = min(_call_ms(backend, n) for _ in range(5))
            speed[n] = round(4 * n * n / 2 * HEAD_DIM * HEADS / (ms / 1e3) / 1e12, 1)
        return {"backend": name, "lengths": lengths, "first_ms": first, "again_ms": again,
                "tflops_2k": speed[2048], "tflops_8k": speed[8192]}
    except RuntimeError as exc:
        return {"backend": name, "error": str(exc).splitlines()[0][:160]}


def main() -> None:
    info = run_info()
    print("cudnn sdp enabled:", torch.backends.cuda.cudnn_sdp_enabled(), "flash:", torch.backends.cuda.flash_sdp_enabled(),
          flush=True)
    rows = [probe(name, backend, offset=i * 3) for i, (name, backend) in enumerate(BACKENDS.items())]
    table = [[r["backend"], r.get("first_ms", r.get("error")), r.get("again_ms", ""), r.get("tflops_2k", ""),
              r.get("tflops_8k", "")] for r in rows]
    markdown = "\n".join(["# SDPA: first use of a new prompt length, per backend", "",
                          f"{info.get('device')} · commit {info['commit']} · {info['date']} · torch {torch.__version__}",
                          "", markdown_table(["backend", "first call ms (new lengths)", "repeat ms", "TFLOP/s 2k",
                                              "TFLOP/s 8k"], table), ""])
    print(markdown)
    write_results("sdpa_probe", info, {"rows": rows}, markdown)


if __name__ == "__main__":
    main()

"""The one-row GEMV, read from the PTX Triton generates for an H100/H200 (sm_90; compiled on the CPU): one
kernel streaming its weights with 128-bit loads, no atomics. The GPU tests check the values."""

from __future__ import annotations

import re

import pytest

from tests.support.ptx import compile_ptx

pytest.importorskip("triton")

COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pdserve.engine.kernels.skinny_gemm import _skinny_kernel, skinny_config

target = GPUTarget("cuda", 90, 32)
out = {}
for gated in (False, True):
    block_n, block_k, warps = skinny_config(4096, 4096, gated)
    constexprs = {"GATED": gated, "BLOCK_N": block_n, "BLOCK_K": block_k}
    signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32", "stride_wn": "i32"}
    signature |= dict.fromkeys(constexprs, "constexpr")
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(6)}  # as the launcher specialises 16-aligned arguments
    source = ASTSource(_skinny_kernel, signature, constexprs=constexprs, attrs=aligned)
    out[f"gemv gated={gated}"] = triton.compile(source, target=target, options={"num_warps": warps}).asm["ptx"]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    return compile_ptx(COMPILE)


@pytest.mark.parametrize("gated", [False, True])
def test_the_gemv_streams_weights_in_wide_loads(ptx: dict[str, str], gated: bool) -> None:
    code = ptx[f"gemv gated={gated}"]
    assert "atom." not in code and code.count(".entry") == 1
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", code), "no 128-bit loads"

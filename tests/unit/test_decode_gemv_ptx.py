"""The split decode kernel's in-kernel merge and the one-row GEMV, read from the PTX Triton generates for an
H100/H200 (sm_90; compiled on the CPU): every lane's partial results are stored before a CTA barrier, one
lane then counts the program's arrival with a GPU-scope acquire-release atomic, and the merging program
reads the other programs' partial results past L1 (``ld.global.cg``); the GEMV streams its weights with
128-bit loads in one launch (no atomics, no second kernel). The GPU tests check the values."""

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
from pdserve.engine.kernels.paged_decode import MERGE_SPLIT_CHUNK, _decode_partial_kernel
from pdserve.engine.kernels.skinny_gemm import _skinny_kernel, skinny_config

target = GPUTarget("cuda", 90, 32)
names = ["q_ptr", "k_cache_ptr", "v_cache_ptr", "block_tables_ptr", "seq_lens_ptr", "num_active_ptr",
         "num_splits_ptr", "out_ptr", "part_out_ptr", "part_lse_ptr", "arrivals_ptr", "scale_log2", "window",
         "stride_qs", "stride_qh", "stride_cb", "stride_ct", "stride_ch", "stride_bt", "stride_os", "stride_oh",
         "stride_pi", "stride_ph", "stride_li"]
types = ["*bf16"] * 3 + ["*i32"] * 4 + ["*bf16", "*fp32", "*fp32", "*i32", "fp32"] + ["i32"] * 12
constexprs = {"GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_N": 64, "DOT_PRECISION": "tf32",
              "SPLIT": True, "SPLIT_CHUNK": MERGE_SPLIT_CHUNK}
signature = dict(zip(names, types)) | dict.fromkeys(constexprs, "constexpr")
out = {"decode": triton.compile(ASTSource(_decode_partial_kernel, signature, constexprs=constexprs), target=target,
                                options={"num_warps": 4, "num_stages": 2}).asm["ptx"]}
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


def test_the_last_split_acquires_what_the_others_released(ptx: dict[str, str]) -> None:
    code = ptx["decode"]
    atomics = re.findall(r"atom\.global\.\S+", code)
    assert atomics == ["atom.global.gpu.acq_rel.add.u32"], atomics
    atomic = code.index("atom.global.")
    stores_before, after = code[:atomic], code[atomic:]
    last_store = stores_before.rindex("st.global")
    assert "bar.sync" in stores_before[last_store:], "no CTA barrier between the partial stores and the release"
    merge_loads = re.findall(r"ld\.global\S*", after)
    assert merge_loads and all(load.startswith("ld.global.cg") for load in merge_loads), set(merge_loads)


@pytest.mark.parametrize("gated", [False, True])
def test_the_gemv_streams_weights_in_wide_loads(ptx: dict[str, str], gated: bool) -> None:
    code = ptx[f"gemv gated={gated}"]
    assert "atom." not in code and code.count(".entry") == 1
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", code), "no 128-bit loads"

"""The peer all-reduce kernel's memory ordering, read from the PTX Triton generates for an H100/H200
(sm_90; compiled here on the CPU, no GPU needed): a program's signal to its peers is a system-scope
release, its wait a system-scope acquire, both done by one thread between CTA barriers, and the
peers' staged data is read with volatile loads (never from a stale L1 line). The GPU tests
(``tests/gpu/test_peer_all_reduce_gpu.py``) check the sums."""

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
from pdserve.engine.kernels.peer_all_reduce import (SMALL, _peer_all_reduce_kernel,
                                                    _peer_all_reduce_rmsnorm_kernel)
out = {}
for data_type in ("*bf16", "*fp32"):
    signature = {"data_ptr": data_type, "stage_table": "*i64", "flag_table": "*i64", "counter_ptr": "*i64",
                 "n": "i32", "half_elements": "i32", "rank": "i32", "exchange": "i32",
                 "WORLD": "constexpr", "PROGRAMS_": "constexpr", "BLOCK_": "constexpr"}
    source = ASTSource(_peer_all_reduce_kernel, signature, constexprs={"WORLD": 2, "PROGRAMS_": SMALL.programs,
                                                                     "BLOCK_": SMALL.block})
    out[data_type] = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    signature = {"data_ptr": data_type, "residual_ptr": data_type, "weight_ptr": data_type, "stage_table": "*i64",
                 "flag_table": "*i64", "counter_ptr": "*i64", "rows": "i32", "half_elements": "i32", "rank": "i32",
                 "eps": "fp32", "exchange": "i32", "HIDDEN": "constexpr", "ROW_BLOCK": "constexpr",
                 "WORLD": "constexpr", "PROGRAMS_": "constexpr"}
    source = ASTSource(_peer_all_reduce_rmsnorm_kernel, signature,
                       constexprs={"HIDDEN": 4096, "ROW_BLOCK": 4096, "WORLD": 2, "PROGRAMS_": SMALL.programs})
    out["norm" + data_type] = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                             options={"num_warps": 16}).asm["ptx"]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    return compile_ptx(COMPILE)


@pytest.mark.parametrize("kernel", ["", "norm"])  # the plain all-reduce, and the one fused with RMSNorm
@pytest.mark.parametrize("data_type", ["*bf16", "*fp32"])
def test_signals_release_and_waits_acquire_at_system_scope(ptx: dict[str, str], data_type: str, kernel: str) -> None:
    code = ptx[kernel + data_type]
    assert re.search(r"@%p\d+ atom\.global\.sys\.release\.exch\.b64", code), "the signal is not a predicated release"
    assert re.search(r"@%p\d+ ld\.global\.sys\.acquire\.b64", code), "the wait is not a predicated acquire"
    width = "b16" if data_type == "*bf16" else "b32"
    assert f"ld.volatile.global.{width}" in code, "the peers' staged data is read through the cache"
    assert code.count("bar.sync") >= 2

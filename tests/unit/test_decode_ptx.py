"""The paged decode kernels compiled for an H100/H200 (sm_90, on the CPU): every launch variant the engine
uses builds, and only the item-table variants read the item table. The GPU tests check the values."""

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
from pdserve.engine.kernels.paged_decode import _decode_merge_kernel, _decode_partial_kernel

target = GPUTarget("cuda", 90, 32)
out = {}
pointers = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "num_active_ptr": "*i32", "num_splits_ptr": "*i32", "item_starts_ptr": "*i32",
            "item_seq_ptr": "*i32", "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
scalars = {"scale_log2": "fp32", "window": "i32"} | dict.fromkeys(
    ["stride_qs", "stride_qh", "stride_cb", "stride_ct", "stride_ch", "stride_bt", "stride_os", "stride_oh",
     "stride_pi", "stride_ph", "stride_li"], "i32")
for split in (False, True):
    for table in ((False, True) if split else (False,)):
        constexprs = {"GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_N": 64,
                      "DOT_PRECISION": "tf32", "SPLIT": split, "ITEM_TABLE": table}
        signature = pointers | scalars | dict.fromkeys(constexprs, "constexpr")
        source = ASTSource(_decode_partial_kernel, signature, constexprs=constexprs)
        out[f"partial split={split} table={table}"] = triton.compile(
            source, target=target, options={"num_warps": 4, "num_stages": 2}).asm["ptx"]
for table in (False, True):
    constexprs = {"HEAD_DIM": 128, "SPLIT_CHUNK": 8, "ITEM_TABLE": table}
    signature = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16", "num_active_ptr": "*i32",
                 "num_splits_ptr": "*i32", "item_starts_ptr": "*i32", "num_heads": "i32"}
    signature |= dict.fromkeys(["stride_pi", "stride_ph", "stride_li", "stride_os", "stride_oh"], "i32")
    signature |= dict.fromkeys(constexprs, "constexpr")
    source = ASTSource(_decode_merge_kernel, signature, constexprs=constexprs)
    out[f"merge table={table}"] = triton.compile(source, target=target, options={"num_warps": 4}).asm["ptx"]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    return compile_ptx(COMPILE)


def loads_param(code: str, index: int) -> bool:
    """Whether the kernel reads its ``index``-th parameter (PTX names them ``<kernel>_param_<i>``)."""
    return re.search(rf"ld\.param\.\w+\s+%\w+,\s*\[\w+_param_{index}\]", code) is not None


@pytest.mark.parametrize("variant", ["partial split=False table=False", "partial split=True table=False",
                                     "partial split=True table=True", "merge table=False", "merge table=True"])
def test_every_decode_launch_variant_compiles_for_sm90(ptx: dict[str, str], variant: str) -> None:
    code = ptx[variant]
    assert code.count(".entry") == 1 and "ld.global" in code


def test_only_the_item_table_variants_read_the_table(ptx: dict[str, str]) -> None:
    """The default launches (one split count for every decode) never touch the item table: parameters 7 and
    8 of the partial kernel (``item_starts_ptr``, ``item_seq_ptr``), 5 of the merge (``item_starts_ptr``)."""
    assert not loads_param(ptx["partial split=True table=False"], 7)
    assert not loads_param(ptx["partial split=True table=False"], 8)
    assert loads_param(ptx["partial split=True table=True"], 7) and loads_param(ptx["partial split=True table=True"], 8)
    assert not loads_param(ptx["merge table=False"], 5) and loads_param(ptx["merge table=True"], 5)


@pytest.mark.parametrize("table", [False, True])
def test_the_merge_loads_both_counts_before_it_branches(ptx: dict[str, str], table: bool) -> None:
    """The merge reads two device counts (splits, active sequences) before any work: both loads are issued
    before the first branch, so the program waits for memory once, not twice (a branch on the split count
    between them cost every layer of a splitting step a second round trip)."""
    code = ptx[f"merge table={table}"]
    body = code[code.index(".entry"):]
    first_branch = re.search(r"\bbra(\.uni)?\s", body)
    assert first_branch is not None
    before = body[:first_branch.start()]
    assert len(re.findall(r"ld\.global", before)) >= 2

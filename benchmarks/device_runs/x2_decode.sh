#!/usr/bin/env bash
# Two H200s, ~9 min: decode-heavy (128 in / 1,024 out) with the host side fixed since `serve-dh4` (four load
# generator processes, one response per stream write) and 512 slots, where one H200 alone served 28 req/s
# (`serve-g1p1`). Expected: colocated x2 near 28 req/s per GPU at TPOT 15, `auto` (1P1D) about half, by
# construction (its prefill GPU idles); the planner's `apply` (x2_apply.sh) is what answers that.
source benchmarks/device_runs/common.sh
python3 -m benchmarks.serve --configs auto,colocated,colocated-slo --workloads decode-heavy \
  --rates-decode-heavy 12,20,28 --num-requests 400 --max-running 512 --seed 8 --tag x2dh 2>&1 | tail -30

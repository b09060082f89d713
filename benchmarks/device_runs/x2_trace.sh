#!/usr/bin/env bash
# Two H200s, ~7 min: the trace window 0-240 with spread arrivals at x1 and x0.5, `auto` against
# colocated-slo. Predicted at TPOT 15 (performance log): auto 0.892 / 0.850, colocated-slo 0.912 / 0.871.
source benchmarks/device_runs/common.sh
python3 -m benchmarks.serve --configs auto,colocated-slo --workloads trace --trace-path "$TRACE" \
  --trace-requests 240 --time-scales 1,0.5 --trace-arrivals spread --tag x2trace 2>&1 | tail -30

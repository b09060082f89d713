#!/usr/bin/env bash
# Two H200s, ~7 min: the trace window 0-240 with spread arrivals at x1 and x0.5, `auto` against
# colocated-slo. Predicted at TPOT 15, x1 / x0.5 (performance log, with the slack fix of 2c52e24): auto
# 0.871 / 0.863, colocated-slo 0.904 / 0.863.
source benchmarks/device_runs/common.sh
python3 -m benchmarks.serve --configs auto,colocated-slo --workloads trace --trace-path "$TRACE" \
  --trace-requests 240 --time-scales 1,0.5 --trace-arrivals spread --tag x2trace 2>&1 | tail -30

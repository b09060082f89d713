#!/usr/bin/env bash
# One H200, ~6 min: an out-of-sample check of the planner's simulation after the slack fix (2c52e24): the trace
# window 240-480 (never served before) with spread arrivals, colocated-slo at time scales 1 and 0.75. Predicted
# before the run (deploy profile; busy-time calibration pooled over serve-g1tr{tr,ph8,sg9,dh8}; attainment at
# TPOT 25 / 15 / 10 ms): x1 0.821 / 0.787 / 0.754, x0.75 0.758 / 0.713 / 0.579 (profile alone: 0.858 / 0.838 /
# 0.796 and 0.800 / 0.758 / 0.662). Afterwards, on the CPU: planner_accuracy --colocated-measured serve-g1oos-h200.json
source benchmarks/device_runs/common.sh
# (run at dd394bb with both scales in one cluster, the x0.75 point replayed x1's tokens into a warm prefix
# cache: 1.00 attainment, invalid. Since then each trace point gets tokens of its own; x0.75 alone, TAG=g1oos75)
python3 -m benchmarks.serve --configs colocated-slo --num-gpus 1 --workloads trace --trace-path "$TRACE" \
  --trace-start 240 --trace-requests 240 --time-scales "${SCALES:-1,0.75}" --trace-arrivals spread \
  --tag "${TAG:-g1oos}" 2>&1 | tail -20

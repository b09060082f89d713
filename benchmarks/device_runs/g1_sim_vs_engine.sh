#!/usr/bin/env bash
# One H200, ~6 min: the trace window served in-process twice (time scale 1 and 0.5), each request's arrival,
# TTFT and prompt steps recorded, then the planner's simulation fed the same requests (benchmarks.sim_vs_engine):
# is the simulation's long-prompt error (performance log, planner section) in its scheduling, request by request?
source benchmarks/device_runs/common.sh
for scale in 1 0.5; do
  tag=trace-x$scale
  python3 -m benchmarks.step_anatomy --skip-anatomy --rates trace=$scale --trace-path "$TRACE" --num-requests 240 \
    --tag "$tag" 2>&1 | grep -E "^live|^wrote|Error|error" | head -5
  python3 -m benchmarks.sim_vs_engine --anatomy "benchmarks/results/step_anatomy-$tag-h200.json" --tag "$tag" 2>&1 | tail -14
done

#!/usr/bin/env bash
# One H200, ~4 min: the one-GPU tests, then the trace window in-process (x1) with the step budget that allows
# for the step in flight by its predicted time after a long step (the slack it spent is not spent again), and
# the planner's simulation against it (benchmarks.sim_vs_engine): long prompts should need a few more steps
# than at b5eb369 (7.57 for 6k+ tokens), nearer the simulation's 8.3-9.5.
source benchmarks/device_runs/common.sh
python3 -m pytest -q -m "gpu and not multigpu" tests/gpu 2>&1 | tail -5 | tee "$RUN_DIR/gpu-tests-$PDSERVE_COMMIT-h200.log"
python3 -m benchmarks.step_anatomy --skip-anatomy --rates trace=1 --trace-path "$TRACE" --num-requests 240 \
  --tag trace-x1-inflight 2>&1 | grep -E "^live|^wrote|Error|error" | head -5
python3 -m benchmarks.sim_vs_engine --anatomy benchmarks/results/step_anatomy-trace-x1-inflight-h200.json \
  --tag trace-x1-inflight 2>&1 | tail -14

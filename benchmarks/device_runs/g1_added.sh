#!/usr/bin/env bash
# One H200, ~2.5 min: the trace window in-process (x1) once more, now recording when each request reached
# the engine (between steps): is the short prompts' 4-12 ms gap to the simulation the wait for the step in
# progress (sim_vs_engine lets the simulated request arrive when the engine got it)?
source benchmarks/device_runs/common.sh
python3 -m benchmarks.step_anatomy --skip-anatomy --rates trace=1 --trace-path "$TRACE" --num-requests 240 \
  --replay-per-kind 4 --tag trace-x1-added 2>&1 | grep -E "^live|^wrote|Error|error" | head -5
python3 -m benchmarks.sim_vs_engine --anatomy benchmarks/results/step_anatomy-trace-x1-added-h200.json \
  --tag trace-x1-added 2>&1 | tail -14

#!/usr/bin/env bash
# One H200, ~4 min: the trace window (240 requests, spread arrivals, x1) served in-process with every step
# recorded, its steps with prompt chunks judged by their earlier context against the step-time model: do
# long prompts' later chunks cost less than the model prices them (the trace simulation's open error,
# performance log, planner section)?
source benchmarks/device_runs/common.sh
python3 -m benchmarks.step_anatomy --skip-anatomy --rates trace=1 --trace-path "$TRACE" --num-requests 240 \
  --tag trace 2>&1 | tail -40

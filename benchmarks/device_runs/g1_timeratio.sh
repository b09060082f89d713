#!/usr/bin/env bash
# One H200, ~8 min: the one-GPU test suite at this commit, then two colocated-slo serving runs whose
# workers report `time_ratio` (measured over profiled busy seconds per kind of step) beside the per-step
# calibration: the trace window 0-240 with spread arrivals at x1 (as `serve-g1trs1`) and prefill-heavy
# at 8 / 10 / 12 req/s, seed 8 (as `serve-g1fill8`). Afterwards, on the CPU:
#   python -m benchmarks.planner_accuracy --statistic time --colocated-measured ... --trace-path ...
source benchmarks/device_runs/common.sh
python3 -m pytest -q -m "gpu and not multigpu" tests/gpu 2>&1 | tail -15 | tee "$RUN_DIR/gpu-tests-$PDSERVE_COMMIT-h200.log"
python3 -m benchmarks.serve --configs colocated-slo --num-gpus 1 --workloads trace --trace-path "$TRACE" \
  --trace-requests 240 --time-scales 1 --trace-arrivals spread --tag g1trtr 2>&1 | tail -30
python3 -m benchmarks.serve --configs colocated-slo --num-gpus 1 --workloads prefill-heavy \
  --rates-prefill-heavy 8,10,12 --seed 8 --tag g1trph8 2>&1 | tail -30

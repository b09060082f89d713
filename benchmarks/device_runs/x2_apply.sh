#!/usr/bin/env bash
# Two H200s, ~9 min: the planner's `apply` mode against the fixed `auto` and colocated-slo on a workload
# that turns from decode-heavy to prefill-heavy halfway (90 s a phase); PART=1 seed 0, PART=2 seed 1.
source benchmarks/device_runs/common.sh
seed=$((${PART:-1} - 1))
python3 -m benchmarks.planner_apply --configs apply,auto,colocated-slo --phase-s 90 --seed $seed \
  --tag x2apply$seed 2>&1 | tail -30

#!/usr/bin/env bash
# Two H200s, ~8 min a part: prefill-heavy with the engine of 2026-12-02 (graph fill, balanced splits), the
# three configurations of the scheduling issue's table; PART=1 seed 4, PART=2 seed 5 (the spread of seeds).
source benchmarks/device_runs/common.sh
seed=$((3 + ${PART:-1}))
python3 -m benchmarks.serve --configs auto,colocated,colocated-slo --workloads prefill-heavy \
  --rates-prefill-heavy 8,12,16 --seed $seed --tag x2ph$seed 2>&1 | tail -30

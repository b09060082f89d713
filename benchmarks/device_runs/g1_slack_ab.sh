#!/usr/bin/env bash
# One H200, ~8 min: the A/B of the step budget's in-flight allowance (a167f1d) where TPOT is tight:
# colocated-slo on prefill-heavy at 8 / 10 / 12 req/s, seed 8 (as serve-g1trph8: goodput at TPOT 25 / 15 / 10
# 10.2 / 10.1 / 0), with PDSERVE_SLACK_AFTER_LONG_STEP=1 (now) and =0 (before). The claim to test: fewer TPOT
# misses at TPOT 10, for a few ms of TTFT on the longest prompts.
source benchmarks/device_runs/common.sh
for flag in 1 0; do
  PDSERVE_SLACK_AFTER_LONG_STEP=$flag python3 -m benchmarks.serve --configs colocated-slo --num-gpus 1 \
    --workloads prefill-heavy --rates-prefill-heavy 8,10,12 --seed 8 --tag g1slack$flag 2>&1 | grep -A8 "Every point"
done

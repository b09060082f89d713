#!/usr/bin/env bash
# Two H200s, ~6 min: ShareGPT-like with balanced decode splits, three configurations (the planner-accuracy
# target needs three on two workloads), settings of `serve-p6` (seed 2, 48 / 64 / 96 req/s per GPU, set up
# for TPOT 15). The prediction written before it (performance log, "Predicted before that run"):
# colocated-slo 96 / 96 / 89.9, `auto` 96 / 96 / 96. With the simulation of 2026-12-02 (the engine's slack,
# deadline order and graph fill, 2c52e24..a167f1d), same calibration: colocated-slo 96 / 96 / 85.7, `auto`
# 96 / 96 / 96, 1p1d 78.9 / 78.9 / 78.9 (goodput per GPU at TPOT 25 / 15 / 10). Afterwards, on the CPU:
#   python -m benchmarks.planner_accuracy --calibration-from serve-h1-h200x2.json,serve-h2-h200x2.json \
#     --measured serve-p7-h200x2.json --sharegpt-measured serve-x2sg-h200x2.json \
#     --profile benchmarks/results/runs/profile-e92bbae-h200.json --tag x2sg
source benchmarks/device_runs/common.sh
python3 -m benchmarks.serve --configs auto,colocated-slo,1p1d --workloads sharegpt --rates-sharegpt 48,64,96 \
  --seed 2 --tag x2sg 2>&1 | tail -30

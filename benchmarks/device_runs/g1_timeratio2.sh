#!/usr/bin/env bash
# One H200, ~6 min: `time_ratio` on two more workloads, colocated-slo set up for TPOT 15 ms:
# ShareGPT-like at 48 / 64 / 80 req/s, seed 9 (as `serve-g1fillsg9`), and decode-heavy at 16 / 24 req/s
# with 512 slots and 400 requests per point, seed 8 (as `serve-g1dh3`).
source benchmarks/device_runs/common.sh
python3 -m benchmarks.serve --configs colocated-slo --num-gpus 1 --workloads sharegpt \
  --rates-sharegpt 48,64,80 --seed 9 --tag g1trsg9 2>&1 | tail -22
python3 -m benchmarks.serve --configs colocated-slo --num-gpus 1 --workloads decode-heavy \
  --rates-decode-heavy 16,24 --num-requests 400 --max-running 512 --seed 8 --tag g1trdh8 2>&1 | tail -22

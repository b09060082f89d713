#!/usr/bin/env bash
# One H200, ~4 min: where the offline benchmark's 6.7 s go (device time by kind of step against the wall
# time), at the engine benchmark's token budget (8,192) and at 16,384 / 4,096.
source benchmarks/device_runs/common.sh
for budget in 8192 16384 4096; do python3 benchmarks/device_runs/offline_anatomy.py $budget 2>&1 | tail -3; done

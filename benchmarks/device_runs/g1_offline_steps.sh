#!/usr/bin/env bash
# One H200, ~2 min: the offline benchmark's step shapes with their kernels by kind (offline_steps.py).
source benchmarks/device_runs/common.sh
python3 benchmarks/device_runs/offline_steps.py 2>&1 | tail -12

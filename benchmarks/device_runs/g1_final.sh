#!/usr/bin/env bash
# One H200, ~4 min: the one-GPU tests at this commit, and the offline case once more (its slow-launch
# warnings should be gone: launches the device was busy through are no longer reported).
source benchmarks/device_runs/common.sh
python3 -m pytest -q -m "gpu and not multigpu" tests/gpu 2>&1 | tail -15 | tee "$RUN_DIR/gpu-tests-$PDSERVE_COMMIT-h200.log"
python3 benchmarks/device_runs/offline_anatomy.py 8192 > "$RUN_DIR/offline-log.txt" 2>&1
echo "slow-launch warnings: $(grep -c 'launching a step took' "$RUN_DIR/offline-log.txt")"
tail -1 "$RUN_DIR/offline-log.txt" | cut -c1-400

#!/usr/bin/env bash
# Two H200s, ~9 min: every GPU test that needs two GPUs (TP=2, KV over NCCL and between TP degrees,
# the peer all-reduce across GPUs), the all-reduce benchmark (NCCL against the one-shot peer kernel over
# NVLink) and the tensor-parallel cases with the peer kernel, 70B included. First on two GPUs since 1a158bd: the
# NCCL receiver posting a plan's receives outside its lock, and receives landing in place (the split switch on).
source benchmarks/device_runs/common.sh
python3 -m pytest -q -m multigpu tests/gpu 2>&1 | tail -25 | tee "$RUN_DIR/gpu-tests-x2-$PDSERVE_COMMIT-h200x2.log"
python3 -m benchmarks.all_reduce 2>&1 | tail -25
python3 -m benchmarks.tensor_parallel --cases 8b-tp1,8b-tp2,8b-tp2-peer,8b-tp2-peer-wide,70b-tp2-peer 2>&1 | tail -30

#!/usr/bin/env bash
# Two H200s, ~9 min: the KV transports against raw NCCL (NVLink and the socket stand-in) and CUDA IPC; then
# serving `auto` prefill-heavy over NCCL through its socket transport (the cross-host stand-in, issue 11
# item 4), seed 4 at 8 / 12 req/s per GPU, against `serve-h2n` (NCCL over NVLink) and `serve-h2` (CUDA IPC).
source benchmarks/device_runs/common.sh
python3 -m benchmarks.kv_transfer --backends cuda_ipc,nccl,nccl-socket --skip-cluster 2>&1 | tail -30
python3 -m benchmarks.serve --configs auto --workloads prefill-heavy --rates-prefill-heavy 8,12 --seed 4 \
  --kv-backend nccl-socket --tag x2socket 2>&1 | tail -20

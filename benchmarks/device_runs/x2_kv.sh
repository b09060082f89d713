#!/usr/bin/env bash
# Two H200s, ~5 min: the KV transports against raw NCCL (NVLink and the socket stand-in), and CUDA IPC.
source benchmarks/device_runs/common.sh
python3 -m benchmarks.kv_transfer --backends cuda_ipc,nccl,nccl-socket --skip-cluster 2>&1 | tail -30

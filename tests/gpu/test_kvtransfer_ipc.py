"""The KV transfer contract over CUDA IPC between two processes: receiver on cuda:0 (this process),
sender on cuda:1 (a spawned process) mapping the receiver's caches and writing into them. Skipped
without two CUDA GPUs. The scenarios a one-sided transport does not promise (``TWO_SIDED_ONLY``) are
left out; the decode worker covers them by waiting for the sender's cancel acknowledgement.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdserve.kvtransfer.testing import SCENARIOS, CacheSpec, ProcessGroupTransport
from pdserve.kvtransfer.testing.contract import (
    TWO_SIDED_ONLY,
    check_chunked_transfer,
    check_concurrent_transfers,
)

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs"),
]

LLAMA_LIKE = CacheSpec(num_layers=4, num_src_blocks=96, num_dst_blocks=128, block_size=16, num_kv_heads=8,
                       head_dim=128, dtype="bfloat16", model="llama-3.1-8b-shapes")


def _transport(spec: CacheSpec) -> ProcessGroupTransport:
    return ProcessGroupTransport(spec, "cuda_ipc", receiver_device="cuda:0", sender_device="cuda:1",
                                 op_timeout_s=60.0)


@pytest.fixture(scope="module")
def transport() -> Iterator[ProcessGroupTransport]:
    made = _transport(CacheSpec())
    yield made
    made.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", sorted(set(SCENARIOS) - TWO_SIDED_ONLY))
def test_ipc_contract(transport: ProcessGroupTransport, scenario: str) -> None:
    SCENARIOS[scenario](transport)


@pytest.mark.timeout(300)
def test_ipc_llama_sized_blocks_write_one_sided() -> None:
    made = _transport(LLAMA_LIKE)
    try:
        pair = made.pair()
        assert set(pair.receiver.peer_transports.values()) == {"cuda_ipc"}  # mapped, not the NCCL fallback
        check_chunked_transfer(made)
        check_concurrent_transfers(made)
    finally:
        made.close()

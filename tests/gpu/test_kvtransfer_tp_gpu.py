"""KV transfer between tensor-parallel workers on GPUs: the contract with a side's transfer layers
being views of some KV heads of wider caches (degrees that differ) and, with two GPUs, spread over
both (each rank's cache on its own GPU). The receiver lives here, the sender in a spawned process.

CUDA IPC runs on one GPU too (two processes can map each other's memory on one GPU, so every cache
of both sides sits on it): this checks the strided views end to end. With two GPUs, ranks sit on
cuda:0 and cuda:1 as in a worker: over CUDA IPC per-device copy streams, a destination mapped once
per allocation (a sender of a higher degree writes several ranks into one receiver layer), FINISH
after every device's copies; over NCCL (whose pair needs a GPU per side: the receiver's layer 0 on
cuda:0, the sender's on cuda:1) the other ranks' blocks gathered onto, and scattered from, each
side's first GPU over peer access.
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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
RANKS = "cuda:0,cuda:1" if TWO_GPUS else "cuda:0"

#: (name, backend, spec, receiver devices, sender devices): a transfer layer is one rank's layer, or a
#: view of some of its heads, listed layer-major as ``LLMEngine.transfer_caches`` lists them
CASES = [
    ("ipc-p1-d2", "cuda_ipc", CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, sender_head_split=2), RANKS,
     "cuda:0"),
    ("ipc-p2-d1", "cuda_ipc", CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, receiver_head_split=2), "cuda:0",
     RANKS),
    ("ipc-p2-d2", "cuda_ipc", CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64), RANKS, RANKS),
    ("ipc-p2-d4", "cuda_ipc", CacheSpec(num_layers=8, num_kv_heads=1, head_dim=64, sender_head_split=2), RANKS,
     RANKS),
]
if TWO_GPUS:
    CASES += [
        ("nccl-p2-d1", "nccl", CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, receiver_head_split=2),
         "cuda:0", "cuda:1,cuda:0"),
        ("nccl-p1-d2", "nccl", CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, sender_head_split=2),
         "cuda:0,cuda:1", "cuda:1"),
        ("nccl-p2-d2", "nccl", CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64), "cuda:0,cuda:1",
         "cuda:1,cuda:0"),
    ]
#: Llama-3.1-8B's per-rank blocks at P TP=2 -> D TP=1 (4 KV heads of 128 per view, bf16)
LLAMA_LIKE = CacheSpec(num_layers=4, num_src_blocks=96, num_dst_blocks=128, block_size=16, num_kv_heads=4,
                       head_dim=128, dtype="bfloat16", model="llama-3.1-8b-shapes", receiver_head_split=2)


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def transport(request: pytest.FixtureRequest) -> Iterator[ProcessGroupTransport]:
    _, backend, spec, receiver_devices, sender_devices = request.param
    made = ProcessGroupTransport(spec, backend, receiver_device=receiver_devices, sender_device=sender_devices,
                                 op_timeout_s=60.0)
    yield made
    made.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_contract_between_tensor_parallel_degrees(transport: ProcessGroupTransport, scenario: str) -> None:
    if transport.name == "cuda_ipc" and scenario in TWO_SIDED_ONLY:
        pytest.skip("not promised by a one-sided transport")
    pair = transport.pair()
    assert set(pair.receiver.peer_transports.values()) == {transport.name}  # type: ignore[attr-defined]
    SCENARIOS[scenario](transport)


@pytest.mark.timeout(300)
def test_llama_sized_head_views() -> None:
    made = ProcessGroupTransport(LLAMA_LIKE, "cuda_ipc", receiver_device="cuda:0", sender_device=RANKS,
                                 op_timeout_s=60.0)
    try:
        check_chunked_transfer(made)
        check_concurrent_transfers(made)
    finally:
        made.close()

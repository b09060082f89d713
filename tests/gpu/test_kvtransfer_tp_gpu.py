"""KV transfer between tensor-parallel workers on GPUs: the contract over CUDA IPC with a side's transfer
layers being views of some KV heads of wider caches (degrees that differ) and, with two GPUs, spread
over both (each rank's cache on its own GPU). The receiver lives here, the sender in a spawned process.

With one GPU every cache of both sides sits on it (two processes can map each other's memory on one
GPU): this checks the strided views end to end. With two, ranks sit on cuda:0 and cuda:1 as in a
worker: per-device copy streams, a destination mapped once per allocation (a sender of a higher degree
writes several ranks into one receiver layer), and FINISH after every device's copies.
The process-group transports move one GPU's cache per worker, so a cache that spans GPUs is refused
over NCCL with a message that says so.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdserve.kvtransfer import HandshakeError, open_receiver
from pdserve.kvtransfer.testing import SCENARIOS, CacheSpec, ProcessGroupTransport
from pdserve.kvtransfer.testing.contract import (
    TWO_SIDED_ONLY,
    check_chunked_transfer,
    check_concurrent_transfers,
)
from pdserve.kvtransfer.testing.spec import sentinel_caches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
RANKS = "cuda:0,cuda:1" if TWO_GPUS else "cuda:0"

#: (name, spec, receiver devices, sender devices): a transfer layer is one rank's layer, or a view of
#: some of its heads, listed layer-major as ``LLMEngine.transfer_caches`` lists them
CASES = [
    ("p1-d2", CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, sender_head_split=2), RANKS, "cuda:0"),
    ("p2-d1", CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, receiver_head_split=2), "cuda:0", RANKS),
    ("p2-d2", CacheSpec(num_layers=4, num_kv_heads=2, head_dim=64), RANKS, RANKS),
    ("p2-d4", CacheSpec(num_layers=8, num_kv_heads=1, head_dim=64, sender_head_split=2), RANKS, RANKS),
]
#: Llama-3.1-8B's per-rank blocks at P TP=2 -> D TP=1 (4 KV heads of 128 per view, bf16)
LLAMA_LIKE = CacheSpec(num_layers=4, num_src_blocks=96, num_dst_blocks=128, block_size=16, num_kv_heads=4,
                       head_dim=128, dtype="bfloat16", model="llama-3.1-8b-shapes", receiver_head_split=2)


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def transport(request: pytest.FixtureRequest) -> Iterator[ProcessGroupTransport]:
    _, spec, receiver_devices, sender_devices = request.param
    made = ProcessGroupTransport(spec, "cuda_ipc", receiver_device=receiver_devices, sender_device=sender_devices,
                                 op_timeout_s=60.0)
    yield made
    made.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", sorted(set(SCENARIOS) - TWO_SIDED_ONLY))
def test_contract_between_tensor_parallel_degrees(transport: ProcessGroupTransport, scenario: str) -> None:
    pair = transport.pair()
    assert set(pair.receiver.peer_transports.values()) == {"cuda_ipc"}  # type: ignore[attr-defined]
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


@pytest.mark.skipif(not TWO_GPUS, reason="a cache over several GPUs needs two")
@pytest.mark.timeout(300)
def test_a_cache_over_several_gpus_is_refused_over_nccl() -> None:
    spec = CacheSpec(num_layers=4)
    layout = spec.layout()
    with pytest.raises(ValueError, match=r"nccl KV transfer backend cannot receive here.*spans cuda:0, cuda:1"):
        open_receiver(caches=sentinel_caches(layout, 8, RANKS), layout=layout, backend="nccl")
    made = ProcessGroupTransport(spec, "nccl", receiver_device="cuda:0", sender_device=RANKS)
    try:
        with pytest.raises(HandshakeError, match="spans cuda:0, cuda:1.*only over CUDA IPC"):
            made.open_pair()
    finally:
        made.close()

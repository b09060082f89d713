"""The KV transfer contract between two processes on two GPUs: receiver on cuda:0 (this process),
sender on cuda:1 (a spawned process), over NCCL and over CUDA IPC (the sender maps the receiver's
caches and writes into them). Skipped without two CUDA GPUs.

Besides the contract scenarios on the small test caches, two of them run again on Llama-3.1-8B-shaped
blocks (16 tokens x 8 KV heads x 128, bf16: 64 KiB per block and layer), so the buffers are big enough
for NCCL's chunked protocol and for the sender's in-flight accounting to matter. CUDA IPC leaves out
the scenarios a one-sided transport does not promise (``TWO_SIDED_ONLY``); the decode worker covers
them by waiting for the sender's cancel acknowledgement.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pdserve.kvtransfer import TransferState
from pdserve.kvtransfer.testing import SCENARIOS, CacheSpec, ProcessGroupTransport
from pdserve.kvtransfer.testing.contract import (
    TWO_SIDED_ONLY,
    assert_landed,
    assert_untouched,
    check_chunked_transfer,
    check_concurrent_transfers,
)

pytestmark = [
    pytest.mark.multigpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs"),
]

BACKENDS = ("nccl", "cuda_ipc")
LLAMA_LIKE = CacheSpec(num_layers=4, num_src_blocks=96, num_dst_blocks=128, block_size=16, num_kv_heads=8,
                       head_dim=128, dtype="bfloat16", model="llama-3.1-8b-shapes")


def _transport(spec: CacheSpec, backend: str) -> ProcessGroupTransport:
    return ProcessGroupTransport(spec, backend, receiver_device="cuda:0", sender_device="cuda:1",
                                 op_timeout_s=60.0)


@pytest.fixture(scope="module", params=BACKENDS)
def transport(request: pytest.FixtureRequest) -> Iterator[ProcessGroupTransport]:
    made = _transport(CacheSpec(), request.param)
    yield made
    made.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_contract(transport: ProcessGroupTransport, scenario: str) -> None:
    if transport.name == "cuda_ipc" and scenario in TWO_SIDED_ONLY:
        pytest.skip("not promised by a one-sided transport")
    SCENARIOS[scenario](transport)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_sized_blocks(backend: str) -> None:
    made = _transport(LLAMA_LIKE, backend)
    try:
        pair = made.pair()
        # the sender really took the transport asked for (CUDA IPC did not fall back to NCCL)
        assert set(pair.receiver.peer_transports.values()) == {backend}  # type: ignore[attr-defined]
        check_chunked_transfer(made)
        check_concurrent_transfers(made)
    finally:
        made.close()


@pytest.mark.timeout(300)
def test_nccl_coalesced_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """One message per layer (the spawned sender reads these limits at import): a transfer whose layers
    are computed before its plan is made goes in coalesced launches, which the receiver must group alike
    (NCCL hangs otherwise); the bytes land exactly and concurrent transfers still do."""
    monkeypatch.setenv("PDSERVE_KV_COALESCE", "1")  # off by default; the receiver follows the plan
    monkeypatch.setenv("PDSERVE_KV_MIN_MESSAGE_BYTES", "1")
    monkeypatch.setenv("PDSERVE_KV_MAX_MESSAGE_BYTES", str(64 << 10))
    made = _transport(LLAMA_LIKE, "nccl")
    try:
        check_chunked_transfer(made)
        check_concurrent_transfers(made)
    finally:
        made.close()


@pytest.mark.timeout(300)
def test_nccl_receives_land_in_place_when_the_destination_is_contiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    """Receiving straight into the decode blocks (no staging, no scatter; off by default because each
    NCCL operation cost more host time than the scatter it saves): with every part split into keys and
    values, a transfer into consecutive blocks lands in place, exactly, and a scattered one still lands
    through staging on the same channel."""
    monkeypatch.setenv("PDSERVE_KV_MIN_SPLIT_BYTES", "1")
    monkeypatch.setenv("PDSERVE_KV_MIN_MESSAGE_BYTES", "1")
    monkeypatch.setenv("PDSERVE_KV_MAX_MESSAGE_BYTES", str(64 << 10))  # each layer's part goes alone
    made = _transport(LLAMA_LIKE, "nccl")
    try:
        pair = made.pair()
        src, dst, layers = list(range(3, 10)), list(range(40, 47)), LLAMA_LIKE.num_layers
        handle = pair.receiver.expect(9001, "req-in-place", dst, layers, 30.0)
        pair.sender.begin(9001, "req-in-place", dst)
        pair.sender.send_layers(9001, range(layers), src, (0, len(src)))
        pair.sender.finish(9001, [5])
        assert pair.receiver.wait(handle, 30.0) is TransferState.DONE, handle.error
        assert_landed(pair, src, dst, range(len(src)))
        assert_untouched(pair, dst)
        assert pair.receiver.landed_messages["direct"] >= layers  # type: ignore[attr-defined]
        check_concurrent_transfers(made)
    finally:
        made.close()

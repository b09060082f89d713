"""The CUDA IPC transport's logic on CPU: one-sided writes, FINISH only after them, cancel, refusal.

The mapping itself needs two GPUs (``tests/gpu/test_kvtransfer_gpu.py``); here the sender is given
the receiver's own cache tensors in place of the mapped ones, over a real receiver and store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pdserve.engine.kernels import triton_available
from pdserve.kvtransfer import HandshakeError, KVLayoutInfo, LayerSend, TransferState, open_receiver
from pdserve.kvtransfer.block_copy import copy_blocks, copy_blocks_reference
from pdserve.kvtransfer.cuda_ipc import IpcUnavailable, host_identity, map_caches
from pdserve.kvtransfer.ipc_sender import open_ipc_sender


def _caches(num_blocks: int = 8, fill: bool = True) -> list[torch.Tensor]:
    make = torch.randn if fill else torch.zeros
    return [make(2, num_blocks, 4, 2, 4) for _ in range(3)]


def _layout(caches: list[torch.Tensor]) -> KVLayoutInfo:
    return KVLayoutInfo.from_caches(caches, "tiny")


@contextlib.contextmanager
def _pair(group: str, num_dst_blocks: int = 8) -> Iterator[tuple[Any, Any, list[torch.Tensor], list[torch.Tensor]]]:
    """(receiver, IPC sender writing into the receiver's own caches, src caches, dst caches)."""
    src, dst = _caches(), _caches(num_blocks=num_dst_blocks, fill=False)
    receiver, bootstrap = open_receiver(caches=dst, layout=_layout(dst), group_name=group, accept_one_sided=True)
    try:
        sender = open_ipc_sender(bootstrap, src, _layout(src), remote_caches=dst, name=group)
        try:
            yield receiver, sender, src, dst
        finally:
            sender.close()
    finally:
        receiver.close()


def test_one_sided_writes_land_before_finish_and_only_in_the_transfers_blocks() -> None:
    with _pair("ipc-ok", num_dst_blocks=10) as (receiver, sender, src, dst):
        dst_ids, src_ids = [9, 3, 5], [1, 2, 7]
        rh = receiver.expect(1, "r", dst_ids, 3, deadline_s=10.0)
        sh = sender.begin(1, "r", dst_ids, num_skip_blocks=1)
        for layer in range(3):  # two chunks, as a chunked prefill sends them
            sender.send_layer(sh, layer, src[layer], src_ids, (0, 2))
            sender.send_layer(sh, layer, src[layer], src_ids, (2, 3))
        sender.finish(sh, [42])
        assert receiver.wait(rh, 10.0) is TransferState.DONE
        assert rh.first_token == 42
        assert sender.wait(sh, 10.0) is TransferState.DONE
        for layer in range(3):
            assert torch.equal(dst[layer][:, [3, 5]], src[layer][:, [2, 7]])
            assert not dst[layer][:, [9]].any()  # below num_skip_blocks: never written
            untouched = [b for b in range(10) if b not in (3, 5)]
            assert not dst[layer][:, untouched].any()


def test_a_prepared_step_writes_every_transfers_blocks_as_per_call_sends_would() -> None:
    with _pair("ipc-step", num_dst_blocks=10) as (receiver, sender, src, dst):
        # transfer 1: blocks [0, 2) of a chunked prompt with one skipped block; transfer 2: a whole prompt
        rh1, rh2 = receiver.expect(1, "a", [9, 3, 5], 3, 10.0), receiver.expect(2, "b", [0, 1], 3, 10.0)
        sh1, sh2 = sender.begin(1, "a", [9, 3, 5], num_skip_blocks=1), sender.begin(2, "b", [0, 1])
        first = sender.prepare_step([LayerSend(sh1, [1, 2, 7], (0, 2)), LayerSend(sh2, [6, 4], (0, 2))])
        for layer in range(3):
            sender.send_step_layer(first, layer, src[layer])
        sender.finish(sh2, [7])
        second = sender.prepare_step([LayerSend(sh1, [1, 2, 7], (2, 3))])  # the prompt's next chunk
        for layer in range(3):
            sender.send_step_layer(second, layer, src[layer])
        sender.finish(sh1, [42])
        assert receiver.wait(rh1, 10.0) is TransferState.DONE and receiver.wait(rh2, 10.0) is TransferState.DONE
        assert (rh1.first_token, rh2.first_token) == (42, 7)
        for layer in range(3):
            assert torch.equal(dst[layer][:, [3, 5, 0, 1]], src[layer][:, [2, 7, 6, 4]])
            assert not dst[layer][:, [2, 4, 6, 7, 8, 9]].any()  # skipped or not the transfers' blocks


def test_a_transfer_cancelled_mid_step_gets_no_more_layers_the_others_do() -> None:
    with _pair("ipc-step-cancel") as (receiver, sender, src, dst):
        receiver.expect(1, "a", [0], 3, 10.0)
        rh2 = receiver.expect(2, "b", [1], 3, 10.0)
        sh1, sh2 = sender.begin(1, "a", [0]), sender.begin(2, "b", [1])
        step = sender.prepare_step([LayerSend(sh1, [5], (0, 1)), LayerSend(sh2, [6], (0, 1))])
        sender.send_step_layer(step, 0, src[0])
        sender.cancel(sh1)
        for layer in (1, 2):
            sender.send_step_layer(step, layer, src[layer])
        sender.finish(sh2, [3])
        assert receiver.wait(rh2, 10.0) is TransferState.DONE
        assert torch.equal(dst[0][:, 0], src[0][:, 5])  # written before the cancel
        assert not dst[1][:, 0].any() and not dst[2][:, 0].any()
        assert all(torch.equal(dst[layer][:, 1], src[layer][:, 6]) for layer in range(3))


def test_prepare_step_checks_its_arguments() -> None:
    with _pair("ipc-step-bad") as (_, sender, src, _dst):
        handle = sender.begin(1, "a", [0, 1])
        with pytest.raises(ValueError, match="src_block_ids must lie"):
            sender.prepare_step([LayerSend(handle, [0, 99], (0, 2))])
        with pytest.raises(ValueError, match="block_range"):
            sender.prepare_step([LayerSend(handle, [0, 1], (0, 3))])
        step = sender.prepare_step([LayerSend(handle, [0, 1], (0, 2))])
        with pytest.raises(ValueError, match="layer must lie"):
            sender.send_step_layer(step, 3, src[0])
        sender.finish(handle, [1])
        with pytest.raises(ValueError, match="after finish"):
            sender.prepare_step([LayerSend(handle, [0, 1], (0, 2))])


def test_cancel_reaches_the_receiver_and_stops_the_writes() -> None:
    with _pair("ipc-cancel") as (receiver, sender, src, dst):
        rh = receiver.expect(2, "r", [0, 1], 3, deadline_s=10.0)
        sh = sender.begin(2, "r", [0, 1])
        sender.send_layer(sh, 0, src[0], [4, 5], (0, 2))
        sender.cancel(sh)
        sender.send_layer(sh, 1, src[1], [4, 5], (0, 2))  # ignored: the transfer is over
        assert sender.poll(sh) is TransferState.CANCELLED
        assert receiver.wait(rh, 10.0) is TransferState.FAILED
        assert "cancelled" in (rh.error or "")
        assert not dst[1].any()


def test_close_fails_the_receivers_unfinished_transfers() -> None:
    with _pair("ipc-close") as (receiver, sender, src, dst):
        rh = receiver.expect(3, "r", [0], 3, deadline_s=10.0)
        sh = sender.begin(3, "r", [0])
        sender.send_layer(sh, 0, src[0], [1], (0, 1))
        sender.close()
        assert sender.poll(sh) is TransferState.CANCELLED
        assert receiver.wait(rh, 10.0) is TransferState.FAILED


def test_a_receiver_that_takes_no_one_sided_senders_refuses_them() -> None:
    src, dst = _caches(), _caches(fill=False)
    receiver, bootstrap = open_receiver(caches=dst, layout=_layout(dst), group_name="ipc-refuse")
    try:
        with pytest.raises(HandshakeError, match="backend: this worker uses 'gloo', the peer 'cuda_ipc'"):
            open_ipc_sender(bootstrap, src, _layout(src), remote_caches=dst, join_timeout_s=10.0)
    finally:
        receiver.close()


def test_map_caches_says_why_it_cannot() -> None:
    layout = _layout(_caches())
    gpus = [torch.device("cuda", 0)] * layout.num_layers
    with pytest.raises(IpcUnavailable, match="exported no CUDA IPC handles"):
        map_caches(None, layout, gpus)
    with pytest.raises(IpcUnavailable, match="needs CUDA caches"):
        map_caches({"version": 1, "host": host_identity(), "layers": []}, layout, [torch.device("cpu")] * 3)
    with pytest.raises(IpcUnavailable, match="another host"):
        map_caches({"version": 1, "host": "elsewhere", "layers": []}, layout, gpus)
    with pytest.raises(ValueError, match="exported 0 cache layers for 3 writers"):
        map_caches({"version": 1, "host": host_identity(), "layers": []}, layout, gpus)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_copy_kernel_matches_its_reference(dtype: torch.dtype) -> None:
    """The Triton kernel itself (CPU interpreter here; on the GPU at real shapes in tests/gpu), between
    whole layers and between views of some heads of wider layers (KV moved between tensor-parallel
    degrees), each way."""
    from pdserve.kvtransfer import block_copy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    src_ids = torch.tensor([8, 0, 3], device=device)
    dst_ids = torch.tensor([1, 5, 2], device=device)
    wide_src = torch.randn(2, 9, 4, 6, 8, device=device).to(dtype)
    wide_dst = torch.zeros(2, 6, 4, 6, 8, dtype=dtype, device=device)
    cases = [(wide_src[..., :3, :].contiguous(), wide_dst[..., :3, :].contiguous()),  # 96 elements: a masked tail
             (wide_src.narrow(3, 3, 3), torch.zeros(2, 6, 4, 3, 8, dtype=dtype, device=device)),  # from a view
             (wide_src[..., :3, :].contiguous(), wide_dst.narrow(3, 3, 3)),  # into a view
             (wide_src.narrow(3, 1, 3), wide_dst.narrow(3, 2, 3))]
    for src, dst in cases:
        got_wide, want_wide = torch.zeros_like(dst), torch.zeros_like(dst)
        if not dst.is_contiguous():  # a view into a fresh wide tensor: the other heads must stay zero
            got_wide, want_wide = torch.zeros_like(wide_dst), torch.zeros_like(wide_dst)
        got = got_wide.as_strided(dst.shape, dst.stride(), dst.storage_offset())
        want = want_wide.as_strided(dst.shape, dst.stride(), dst.storage_offset())
        block_copy._launch(src, got, src_ids, dst_ids, 0, 0)
        copy_blocks_reference(src, want, src_ids, dst_ids)
        assert torch.equal(got_wide, want_wide)  # the view's blocks, and nothing outside the view
        assert torch.equal(want[:, dst_ids], src[:, src_ids])
    copy_blocks(cases[0][0], want, src_ids, dst_ids)  # the dispatcher (reference path on CPU)
    with pytest.raises(ValueError, match="3 source blocks but 2 destination"):
        copy_blocks(cases[0][0], want, src_ids, dst_ids[:2])
    with pytest.raises(ValueError, match="contiguous dims"):
        block_copy.block_strides(wide_src.transpose(3, 4))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_message_packing_kernel_matches_the_torch_path() -> None:
    """One launch packs blocks of a layer into a message's key and value positions, and unpacks them
    into another cache: the same bytes as the torch path (the kernel in the CPU interpreter here)."""
    from pdserve.kvtransfer import block_copy
    from pdserve.kvtransfer.messages import pack_layer_blocks, unpack_layer_blocks

    layer = torch.randn(2, 9, 4, 3, 8)  # 96 elements per block: the kernel's masked tail
    src_ids = torch.tensor([8, 0, 3])
    positions = torch.tensor([[0, 1, 4], [2, 3, 5]])  # two parts: 2 blocks then 1 block
    got, want = torch.zeros(6, 4, 3, 8), torch.zeros(6, 4, 3, 8)
    block_copy.gather_into_message(layer, src_ids, got, positions)
    pack_layer_blocks(layer, src_ids, want, positions)
    assert torch.equal(got, want)
    assert torch.equal(want[2], layer[1, 8]) and torch.equal(want[4], layer[0, 3])
    dst_ids = torch.tensor([5, 1, 2])
    into_kernel, into_torch = torch.zeros(2, 7, 4, 3, 8), torch.zeros(2, 7, 4, 3, 8)
    block_copy.scatter_from_message(got, positions, into_kernel, dst_ids)
    unpack_layer_blocks(want, positions, into_torch, dst_ids)
    assert torch.equal(into_kernel, into_torch)
    assert torch.equal(into_torch[:, dst_ids], layer[:, src_ids])
    with pytest.raises(ValueError, match=r"contiguous \[2, 3\] tensor"):
        pack_layer_blocks(layer, src_ids, want, positions[:, :2])
    with pytest.raises(ValueError, match="cannot move blocks"):
        pack_layer_blocks(layer, src_ids, torch.zeros(6, 4, 3, 9), positions)

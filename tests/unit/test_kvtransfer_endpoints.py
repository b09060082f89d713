"""Endpoint behaviour outside the shared contract: misuse, closed endpoints, handshake failures."""

from __future__ import annotations

import dataclasses
import datetime
import json
import socket
import time

import pytest
import torch
import torch.distributed as dist

from pdserve.kvtransfer import (
    HandshakeError,
    KVLayoutInfo,
    LayerSend,
    LoopbackChannel,
    TransferState,
    open_receiver,
    open_sender,
)
from pdserve.kvtransfer.messages import MessageKind
from pdserve.kvtransfer.rendezvous import (
    JOIN_QUEUE,
    join_context,
    join_request,
    receiver_context,
    verdict_context,
    verdict_key,
)
from pdserve.kvtransfer.sealing import cluster_key, open_once, seal_once
from pdserve.kvtransfer.sending import OutgoingMessage, SenderCore


def _caches(num_blocks: int = 8, block_size: int = 4) -> list[torch.Tensor]:
    return [torch.randn(2, num_blocks, block_size, 2, 4) for _ in range(2)]


def _layout(caches: list[torch.Tensor]) -> KVLayoutInfo:
    return KVLayoutInfo.from_caches(caches, "tiny")


def test_loopback_misuse_raises_value_error() -> None:
    src, dst = _caches(), _caches()
    channel = LoopbackChannel(src, _layout(src), dst)
    sender, receiver = channel.sender, channel.receiver
    handle = sender.begin(1, "r", [0, 1, 2])
    receiver.expect(1, "r", [0, 1, 2], 2, 5.0)
    with pytest.raises(ValueError, match="already in progress"):
        sender.begin(1, "r", [0])
    with pytest.raises(ValueError, match="num_skip_blocks"):
        sender.begin(2, "r", [0], num_skip_blocks=2)
    with pytest.raises(ValueError, match="kv_cache_layer has shape"):
        sender.send_layer(handle, 0, torch.zeros(2, 8, 4, 2, 5), [0, 1, 2], (0, 3))
    with pytest.raises(ValueError, match="src_block_ids must lie"):
        sender.send_layer(handle, 0, src[0], [0, 99, 2], (0, 3))
    with pytest.raises(ValueError, match="num_layers is 3"):
        receiver.expect(3, "r", [4], 3, 5.0)
    with pytest.raises(ValueError, match="deadline_s"):
        receiver.expect(3, "r", [4], 2, 0.0)
    sender.send_layer(handle, 0, src[0], [0, 1, 2], (0, 3))
    sender.send_layer(handle, 1, src[1], [0, 1, 2], (0, 3))
    sender.finish(handle, [5])
    assert sender.poll(handle) is TransferState.DONE
    with pytest.raises(ValueError, match="in use or was used recently"):
        receiver.expect(1, "again", [5], 2, 5.0)
    channel.close()
    with pytest.raises(RuntimeError, match="closed"):
        sender.begin(9, "r", [0])
    with pytest.raises(RuntimeError, match="closed"):
        receiver.expect(9, "r", [0], 2, 1.0)


class _Recording(SenderCore):
    """A sender whose transport only records messages (and never completes them)."""

    def __init__(self, caches: list[torch.Tensor]) -> None:
        super().__init__(caches, _layout(caches), peer="nowhere")
        self.sent: list[OutgoingMessage] = []

    def _submit(self, message: OutgoingMessage) -> None:
        self.sent.append(message)

    def close(self) -> None:
        self._mark_closed()


def test_sender_core_builds_the_messages() -> None:
    caches = _caches()
    sender = _Recording(caches)
    handle = sender.begin(5, "r", [10, 11, 12, 13], num_skip_blocks=1)
    sender.send_layer(handle, 0, caches[0], [4, 5, 6, 7], (0, 2))  # index 0 is skipped
    sender.send_layer(handle, 0, caches[0], [4, 5, 6, 7], (0, 1))  # nothing left to send
    sender.send_layer(handle, 1, caches[1], [4, 5, 6, 7], (1, 4))
    assert handle.state is TransferState.IN_PROGRESS
    sender.finish(handle, [99])
    layer0, layer1, finish = (m.header for m in sender.sent)
    assert (layer0.kind, layer0.layer, layer0.start, layer0.num_blocks) == (MessageKind.LAYER, 0, 1, 1)
    assert sender.sent[0].src_block_ids == (5,) and sender.sent[1].src_block_ids == (5, 6, 7)
    assert layer1.payload_nbytes == _layout(caches).payload_nbytes(3)
    assert (finish.kind, finish.start, finish.num_blocks, finish.num_messages, finish.ints) == \
        (MessageKind.FINISH, 1, 4, 2, (99,))
    with pytest.raises(ValueError, match="send_layer after finish"):
        sender.send_layer(handle, 1, caches[1], [4, 5, 6, 7], (1, 4))
    with pytest.raises(ValueError, match="finish called twice"):
        sender.finish(handle, [1])
    sender._message_done(sender.sent[-1])
    assert sender.poll(handle) is TransferState.DONE


def test_sender_core_cancel_and_failure() -> None:
    caches = _caches()
    sender = _Recording(caches)
    first, second = sender.begin(1, "a", [0, 1]), sender.begin(2, "b", [2])
    sender.cancel(first)
    assert first.state is TransferState.CANCELLED and sender.sent[-1].header.kind is MessageKind.CANCEL
    sender.send_layer(first, 0, caches[0], [0, 1], (0, 2))  # ignored once cancelled
    assert len(sender.sent) == 1 and not sender._is_live(1)
    sender._channel_failed("link down")
    assert (second.state, second.error) == (TransferState.FAILED, "link down")
    late = sender.begin(3, "c", [0])
    assert (late.state, late.error) == (TransferState.FAILED, "link down")


def test_loopback_layout_mismatch() -> None:
    src, dst = _caches(block_size=4), _caches(block_size=8)
    with pytest.raises(HandshakeError, match="block_size: this worker has 4, the peer has 8") as info:
        LoopbackChannel(src, _layout(src), dst)
    assert info.value.field == "block_size"


def test_receiver_rejects_loopback_and_cpu_nccl() -> None:
    caches = _caches()
    with pytest.raises(ValueError, match="in-process"):
        open_receiver(caches=caches, layout=_layout(caches), backend="loopback")
    with pytest.raises(ValueError, match="needs CUDA"):
        open_receiver(caches=caches, layout=_layout(caches), backend="nccl")


def test_sender_refuses_a_backend_it_cannot_use() -> None:
    caches = _caches()
    bootstrap = {"host": "127.0.0.1", "port": 1, "group_name": "g", "backend": "nccl"}
    with pytest.raises(HandshakeError, match="backend: the nccl KV transfer backend needs CUDA"):
        open_sender(bootstrap, caches, _layout(caches))


def test_sender_reports_an_unreachable_receiver_within_the_join_timeout() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caches = _caches()
    start = time.monotonic()
    with pytest.raises(HandshakeError, match=f"cannot reach the KV receiver's store at 127.0.0.1:{port}"):
        open_sender({"host": "127.0.0.1", "port": port, "group_name": "g"}, caches, _layout(caches),
                    join_timeout_s=0.5)
    assert time.monotonic() - start < 5.0


def test_receiver_refuses_a_joining_sender_with_another_layout() -> None:
    caches = _caches()
    receiver, bootstrap = open_receiver(caches=caches, layout=_layout(caches), group_name="refuse")
    try:
        store = dist.TCPStore(bootstrap["host"], bootstrap["port"], None, False, datetime.timedelta(seconds=10))
        root = dist.PrefixStore("refuse", store)
        theirs = dataclasses.replace(_layout(caches), head_dim=8)
        key = cluster_key()  # a worker of this cluster (sealed if the session has a token), another layout
        root.queue_push(JOIN_QUEUE, seal_once(key, join_context("refuse"), join_request(7, "liar", theirs,
                                                                                       "gloo").encode()))
        root.wait([verdict_key(7)], datetime.timedelta(seconds=10))
        verdict = open_once(key, verdict_context("refuse", 7), bytes(root.get(verdict_key(7)))).decode()
        assert "head_dim: this worker has 4, the peer has 8" in verdict
        assert receiver.rejected_peers and receiver.rejected_peers[0].startswith("liar: ")
        assert json.loads(open_once(key, receiver_context("refuse"), bytes(root.get("receiver"))))["backend"] == "gloo"
    finally:
        receiver.close()


def _send_a_prepared_step(sender, receiver, src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:  # noqa: ANN001
    """Two transfers through one prepared step, layer by layer; both land whole and DONE."""
    rh1, rh2 = receiver.expect(1, "a", [0, 1], 2, 10.0), receiver.expect(2, "b", [2], 2, 10.0)
    sh1, sh2 = sender.begin(1, "a", [0, 1]), sender.begin(2, "b", [2])
    step = sender.prepare_step([LayerSend(sh1, [4, 5], (0, 2)), LayerSend(sh2, [7], (0, 1))])
    for layer in range(2):
        sender.send_step_layer(step, layer, src[layer])
    sender.finish(sh1, [1])
    sender.finish(sh2, [2])
    assert receiver.wait(rh1, 10.0) is TransferState.DONE and receiver.wait(rh2, 10.0) is TransferState.DONE
    assert (rh1.first_token, rh2.first_token) == (1, 2)
    for layer in range(2):
        assert torch.equal(dst[layer][:, [0, 1, 2]], src[layer][:, [4, 5, 7]])
        assert not dst[layer][:, 3:].any()


def test_a_prepared_step_over_loopback_sends_every_transfers_layers() -> None:
    src, dst = _caches(), [torch.zeros_like(c) for c in _caches()]
    channel = LoopbackChannel(src, _layout(src), dst)
    try:
        _send_a_prepared_step(channel.sender, channel.receiver, src, dst)
    finally:
        channel.close()


def test_a_prepared_step_over_gloo_sends_every_transfers_layers() -> None:
    src, dst = _caches(), [torch.zeros_like(c) for c in _caches()]
    receiver, bootstrap = open_receiver(caches=dst, layout=_layout(dst), group_name="prepared-gloo")
    try:
        sender = open_sender(bootstrap, src, _layout(src))
        try:
            _send_a_prepared_step(sender, receiver, src, dst)
        finally:
            sender.close()
    finally:
        receiver.close()

"""The KV store's values sealed with the cluster token: the primitives, and a stranger on the receiver's
store (an unsealed join, forged and replayed headers) against a real gloo pair."""

from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist

from pdserve.kvtransfer import HandshakeError, KVLayoutInfo, TransferState, open_receiver
from pdserve.kvtransfer.messages import Header, MessageKind, ProtocolError
from pdserve.kvtransfer.process_group import open_sender
from pdserve.kvtransfer.rendezvous import JOIN_QUEUE, MESSAGE_QUEUE, join_request, pair_prefix, verdict_key
from pdserve.kvtransfer.sealing import QueueOpener, SealedQueue, open_once, seal_once
from pdserve.rpc.auth import CLUSTER_TOKEN_ENV


def test_seals_open_only_with_the_same_key_and_place() -> None:
    sealed = seal_once(b"k1", "g/receiver", b"payload")
    assert open_once(b"k1", "g/receiver", sealed) == b"payload"
    for key, context, data, words in ((b"k2", "g/receiver", sealed, "does not match"),
                                      (b"k1", "g/join", sealed, "does not match"),
                                      (b"k1", "g/receiver", sealed[:-1] + b"X", "does not match"),
                                      (b"k1", "g/receiver", b"payload", "unsealed"),
                                      (None, "g/receiver", sealed, "this worker has none")):
        with pytest.raises(ProtocolError, match=words):
            open_once(key, context, data)
    assert open_once(None, "g/receiver", b"plain") == b"plain"  # no token on either side: as before


def test_a_channel_refuses_replayed_and_reordered_headers() -> None:
    class Recorder:
        values: list[bytes] = []

        def queue_push(self, key: str, value: bytes) -> None:
            self.values.append(value)

    store = Recorder()
    queue = SealedQueue(store, "q", b"k", "g/pair/0")
    for i in range(3):
        queue.push(bytes([i]))
    first, second, third = store.values
    opener = QueueOpener(b"k", "g/pair/0")
    assert opener.open(first) == b"\x00" and opener.open(third) == b"\x02"
    with pytest.raises(ProtocolError, match="replayed or reordered"):
        opener.open(second)
    with pytest.raises(ProtocolError, match="replayed or reordered"):
        opener.open(third)
    with pytest.raises(ProtocolError, match="does not match"):
        QueueOpener(b"k", "g/pair/1").open(first)  # another pair's header


def _layout() -> KVLayoutInfo:
    return KVLayoutInfo(model="m", dtype="float32", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8)


def _open_sender(bootstrap: dict, caches: list[torch.Tensor]):  # noqa: ANN202
    made: list = []
    errors: list = []

    def run() -> None:
        try:
            made.append(open_sender(bootstrap, caches, _layout(), join_timeout_s=30.0))  # 3 s failed once on a loaded 2-core CI host
        except Exception as exc:  # noqa: BLE001 (the test looks at it)
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if errors:
        raise errors[0]
    return made[0]


def test_a_stranger_on_the_store_cannot_join_or_forge_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CLUSTER_TOKEN_ENV, "this-cluster")
    gen = torch.Generator().manual_seed(1)
    src = [torch.randn(2, 8, 4, 2, 8, generator=gen) for _ in range(2)]
    dst = [torch.zeros(2, 8, 4, 2, 8) for _ in range(2)]
    receiver, bootstrap = open_receiver("127.0.0.1", 0, "sealed", caches=dst, layout=_layout(), backend="gloo")
    sender = _open_sender(bootstrap, src)
    stranger = dist.TCPStore(bootstrap["host"], bootstrap["port"], None, False, datetime.timedelta(seconds=10))
    root = dist.PrefixStore("sealed", stranger)
    try:
        # a join the stranger writes itself is never answered
        root.queue_push(JOIN_QUEUE, join_request(50, "stranger", _layout(), "gloo"))
        with pytest.raises(Exception, match="timeout"):
            root.wait([verdict_key(50)], datetime.timedelta(seconds=1))
        # headers it pushes onto the live pair's queue are dropped: a FINISH for the transfer below,
        # and a PLAN announcing bytes that would never come
        pair = dist.PrefixStore(pair_prefix("sealed", 0), stranger)
        expected = receiver.expect(1, "r1", [5, 6], 2, 30.0)
        pair.queue_push(MESSAGE_QUEUE, Header(MessageKind.FINISH, 1, ints=(999,)).pack())
        pair.queue_push(MESSAGE_QUEUE, Header(MessageKind.PLAN, num_messages=0).pack())
        sent = sender.begin(1, "r1", [5, 6])
        for layer in range(2):
            sender.send_layer(sent, layer, src[layer], [2, 3], (0, 2))
        sender.finish(sent, [7])
        assert receiver.wait(expected, 30.0) is TransferState.DONE, expected.error
        assert expected.payload == [7]  # not the stranger's 999
        for layer in range(2):
            assert torch.equal(dst[layer][:, [5, 6]], src[layer][:, [2, 3]])
        assert receiver.num_dropped_values == 3
    finally:
        sender.close()
        receiver.close()


def test_workers_with_different_tokens_do_not_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    caches = [torch.zeros(2, 8, 4, 2, 8) for _ in range(2)]
    monkeypatch.setenv(CLUSTER_TOKEN_ENV, "cluster-a")
    receiver, bootstrap = open_receiver("127.0.0.1", 0, "two-tokens", caches=caches, layout=_layout(), backend="gloo")
    try:
        monkeypatch.setenv(CLUSTER_TOKEN_ENV, "cluster-b")
        with pytest.raises(HandshakeError, match="does not match this cluster's token"):
            _open_sender(bootstrap, caches)
        monkeypatch.delenv(CLUSTER_TOKEN_ENV)
        with pytest.raises(HandshakeError, match="this worker has none"):
            _open_sender(bootstrap, caches)
    finally:
        receiver.close()

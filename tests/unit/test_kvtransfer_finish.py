"""When a transfer whose writes the receiver posted itself (NCCL receives) turns DONE after its FINISH:
once *its own* writes completed, not once everything posted on the landing stream after them did.

On a GPU the receiver's landing stream already holds the receives of the next prompt's layers when the
previous prompt's FINISH arrives (the prefill worker announces its next step before that FINISH, whose
first token waits for the step's launch); an event recorded at FINISH would wait for that whole next
prefill step. Stream semantics are reproduced here with events that complete in posting order."""

from __future__ import annotations

import time

import torch

from pdserve.kvtransfer import KVLayoutInfo, TransferState, receiving
from pdserve.kvtransfer.loopback import LoopbackReceiver
from pdserve.kvtransfer.messages import Header, MessageKind


class StreamEvent:
    """An event on a simulated stream: done once every event posted before it and itself are done."""

    def __init__(self, stream: list[StreamEvent]) -> None:
        self.stream, self.released = stream, False
        stream.append(self)

    def query(self) -> bool:
        return all(e.released for e in self.stream[: self.stream.index(self) + 1])


def test_finish_waits_for_its_own_writes_not_later_ones(monkeypatch) -> None:  # noqa: ANN001
    stream: list[StreamEvent] = []
    monkeypatch.setattr(receiving, "record_event", lambda device: StreamEvent(stream))  # "now", on the stream
    caches = [torch.zeros(2, 8, 4, 2, 8) for _ in range(2)]
    layout = KVLayoutInfo.from_caches(caches, "m")
    receiver = LoopbackReceiver(caches, layout)
    try:
        first = receiver.expect(1, "a", [0, 1], 2, deadline_s=30.0)
        second = receiver.expect(2, "b", [2, 3], 2, deadline_s=30.0)
        posted = {}
        for transfer_id in (1, 2):  # first's receives, then the next prompt's (its forward still running)
            with receiver.lock:
                records = [receiver.claim_part("p", Header(MessageKind.LAYER, transfer_id, layer, 0, 2,
                                                           layout.payload_nbytes(2))) for layer in range(2)]
                posted[transfer_id] = StreamEvent(stream)
                receiver.writes_posted(records, posted[transfer_id])
        receiver.deliver_finish("p", Header(MessageKind.FINISH, 1, 0, 0, 2, num_messages=2, ints=(42,)))
        posted[1].released = True  # the first prompt's bytes are in; the second's are not
        assert receiver.wait(first, timeout=2.0) is TransferState.DONE and first.payload == [42]
        assert receiver.poll(second) is TransferState.IN_PROGRESS
        receiver.deliver_finish("p", Header(MessageKind.FINISH, 2, 0, 0, 2, num_messages=2, ints=(7,)))
        time.sleep(0.05)
        assert receiver.poll(second) is TransferState.IN_PROGRESS  # its writes are still on the stream
        posted[2].released = True
        assert receiver.wait(second, timeout=2.0) is TransferState.DONE
    finally:
        receiver.close()


def test_a_finished_transfer_does_not_wait_behind_an_older_one_from_another_channel(monkeypatch) -> None:  # noqa: ANN001
    """Two senders, two landing streams: the older FINISH's writes are still arriving, the newer's are in;
    the newer is DONE at once (the completion thread does not wait out the older one first)."""
    monkeypatch.setattr(receiving, "record_event", lambda device: None)
    caches = [torch.zeros(2, 8, 4, 2, 8) for _ in range(2)]
    layout = KVLayoutInfo.from_caches(caches, "m")
    receiver = LoopbackReceiver(caches, layout)
    try:
        handles, events = [], []
        for transfer_id, peer in ((1, "p1"), (2, "p2")):
            handles.append(receiver.expect(transfer_id, str(transfer_id), [2 * transfer_id, 2 * transfer_id + 1], 2,
                                           deadline_s=30.0))
            events.append(StreamEvent([]))  # a stream of its own per channel
            with receiver.lock:
                records = [receiver.claim_part(peer, Header(MessageKind.LAYER, transfer_id, layer, 0, 2,
                                                            layout.payload_nbytes(2))) for layer in range(2)]
                receiver.writes_posted(records, events[-1])
        for transfer_id, peer in ((1, "p1"), (2, "p2")):
            receiver.deliver_finish(peer, Header(MessageKind.FINISH, transfer_id, 0, 0, 2, num_messages=2, ints=(1,)))
        time.sleep(0.02)  # the completion thread is now waiting on the older transfer's writes
        events[1].released = True
        assert receiver.wait(handles[1], timeout=1.0) is TransferState.DONE
        assert receiver.poll(handles[0]) is TransferState.IN_PROGRESS
        events[0].released = True
        assert receiver.wait(handles[0], timeout=2.0) is TransferState.DONE
    finally:
        receiver.close()


def test_a_finish_is_queued_after_its_own_layers_and_ahead_of_later_transfers() -> None:
    """The sender's queue: a FINISH goes right after its transfer's last queued LAYER (or first, when all
    were taken), ahead of the next prompt's LAYERs, but never ahead of another control message."""
    from collections import deque

    from pdserve.kvtransfer.sending import OutgoingMessage, finish_position

    def queue(*items: tuple[MessageKind, int]) -> deque[OutgoingMessage]:
        return deque(OutgoingMessage(Header(kind, transfer_id)) for kind, transfer_id in items)

    layer, cancel = MessageKind.LAYER, MessageKind.CANCEL
    assert finish_position(queue(), 1) == 0
    assert finish_position(queue((layer, 2), (layer, 2)), 1) == 0  # every layer of 1 already announced
    assert finish_position(queue((layer, 1), (layer, 2), (layer, 2)), 1) == 1
    assert finish_position(queue((layer, 1), (layer, 2), (layer, 1), (layer, 2)), 1) == 3
    assert finish_position(queue((cancel, 3), (layer, 2)), 1) == 1  # behind a queued control message

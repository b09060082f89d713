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


def _pinned_claim(receiver: LoopbackReceiver, layout: KVLayoutInfo, transfer_id: int) -> list:
    """What the NCCL landing does before it posts a plan's receives: claim both layers' parts and pin the
    transfer, under the lock; the writes are then 'being posted' until ``writes_posted``."""
    with receiver.lock:
        records = [receiver.claim_part("p", Header(MessageKind.LAYER, transfer_id, layer, 0, 2,
                                                   layout.payload_nbytes(2))) for layer in range(2)]
        claimed = list({id(r): r for r in records}.values())
        receiver.pin_writes(claimed)
    return claimed


def test_a_transfer_pinned_while_its_writes_are_posted_keeps_its_blocks_until_they_are() -> None:
    """Posting happens outside the receiver's lock: meanwhile the worker may expect other transfers at
    once, and a cancel (or a passed deadline) must not give the blocks back, nor run the callback,
    before the pinned writes were posted (``writes_posted``) and finished."""
    import threading

    caches = [torch.zeros(2, 8, 4, 2, 8) for _ in range(2)]
    layout = KVLayoutInfo.from_caches(caches, "m")
    receiver = LoopbackReceiver(caches, layout)
    ended: list[TransferState] = []
    try:
        handle = receiver.expect(1, "a", [0, 1], 2, deadline_s=30.0, on_terminal=lambda h: ended.append(h.state))
        claimed = _pinned_claim(receiver, layout, 1)
        other = receiver.expect(2, "b", [2, 3], 2, deadline_s=30.0)  # the lock is free while posting
        assert receiver.poll(other) is TransferState.PENDING
        cancelled = threading.Event()
        canceller = threading.Thread(target=lambda: (receiver.cancel(handle), cancelled.set()))
        canceller.start()
        time.sleep(0.1)
        assert handle.state is TransferState.CANCELLED and not cancelled.is_set() and ended == []
        receiver.writes_posted(claimed, None)  # posted (and, on the CPU, finished)
        assert cancelled.wait(2.0)
        canceller.join()
        deadline = time.monotonic() + 2.0
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == [TransferState.CANCELLED]

        # a deadline passing while pinned: TIMED_OUT at once, the callback only after the unpinning
        late = receiver.expect(3, "c", [4, 5], 2, deadline_s=0.05, on_terminal=lambda h: ended.append(h.state))
        claimed = _pinned_claim(receiver, layout, 3)
        time.sleep(0.2)
        assert receiver.poll(late) is TransferState.TIMED_OUT and ended == [TransferState.CANCELLED]
        receiver.writes_posted(claimed, None)
        deadline = time.monotonic() + 2.0
        while len(ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == [TransferState.CANCELLED, TransferState.TIMED_OUT]
    finally:
        receiver.close()


def test_pinned_writes_that_are_never_posted_abandon_the_peer_at_the_fence_timeout() -> None:
    """A channel stuck while posting (its peer stopped sending): at the fence timeout the receiver tells
    the transport to abandon that peer's writes, which ends the posting (here: it unpins), and then
    gives the blocks back."""
    import threading

    caches = [torch.zeros(2, 8, 4, 2, 8) for _ in range(2)]
    layout = KVLayoutInfo.from_caches(caches, "m")
    receiver = LoopbackReceiver(caches, layout, fence_timeout_s=0.2)
    abandoned: list[str] = []
    try:
        handle = receiver.expect(1, "a", [0, 1], 2, deadline_s=30.0)
        claimed = _pinned_claim(receiver, layout, 1)

        def abandon(peer: str) -> None:  # what the process-group receiver does: abort the channel's group
            abandoned.append(peer)
            threading.Thread(target=receiver.writes_posted, args=(claimed, None)).start()

        receiver._abandon_writes = abandon  # type: ignore[method-assign]
        started = time.monotonic()
        receiver.cancel(handle)
        # (cancel and the completion thread both wait on the fence: the peer is abandoned once)
        assert abandoned == ["p"] and 0.15 < time.monotonic() - started < 3.0
        assert handle.state is TransferState.CANCELLED
    finally:
        receiver.close()


def test_a_transfer_ended_by_a_later_part_of_the_plan_being_pinned_waits_for_the_earlier_parts_writes() -> None:
    """One plan claims layer 0 of a transfer, then layer 1 fails it (a malformed part) before the plan is
    pinned: its callback must not run before the writes of layer 0 were posted, and runs exactly once."""
    import threading

    caches = [torch.zeros(2, 8, 4, 2, 8) for _ in range(2)]
    layout = KVLayoutInfo.from_caches(caches, "m")
    receiver = LoopbackReceiver(caches, layout)
    ended: list[TransferState] = []
    try:
        receiver.expect(1, "a", [0, 1], 2, deadline_s=30.0, on_terminal=lambda h: ended.append(h.state))
        with receiver.lock:
            good = receiver.claim_part("p", Header(MessageKind.LAYER, 1, 0, 0, 2, layout.payload_nbytes(2)))
            bad = receiver.claim_part("p", Header(MessageKind.LAYER, 1, 1, 0, 9, layout.payload_nbytes(9)))
            assert good is not None and bad is None and good.handle.state is TransferState.FAILED
            receiver.pin_writes([good])
        time.sleep(0.1)
        assert ended == []  # its block's writes are being posted: the blocks stay held
        threading.Thread(target=receiver.writes_posted, args=([good], None)).start()
        deadline = time.monotonic() + 2.0
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert ended == [TransferState.FAILED]
    finally:
        receiver.close()


def test_a_stalled_fence_does_not_hold_back_other_transfers_callbacks() -> None:
    """A transfer whose writes are stuck being posted (its peer stopped) is fenced until the fence's
    timeout; meanwhile another peer's transfer completes and its callback runs at once, not after it."""
    import threading

    caches = [torch.zeros(2, 8, 4, 2, 8) for _ in range(2)]
    layout = KVLayoutInfo.from_caches(caches, "m")
    receiver = LoopbackReceiver(caches, layout, fence_timeout_s=2.0)
    done: dict[str, float] = {}
    try:
        stuck = receiver.expect(1, "stuck", [0, 1], 2, deadline_s=0.05,
                                on_terminal=lambda h: done.setdefault(h.request_id, time.monotonic()))
        claimed = _pinned_claim(receiver, layout, 1)
        receiver._abandon_writes = (  # type: ignore[method-assign]
            lambda peer: threading.Thread(target=receiver.writes_posted, args=(claimed, None)).start())
        time.sleep(0.2)
        assert stuck.state is TransferState.TIMED_OUT and "stuck" not in done  # fenced: writes being posted
        healthy = receiver.expect(2, "healthy", [2, 3], 2, deadline_s=30.0,
                                  on_terminal=lambda h: done.setdefault(h.request_id, time.monotonic()))
        with receiver.lock:
            records = [receiver.claim_part("q", Header(MessageKind.LAYER, 2, layer, 0, 2, layout.payload_nbytes(2)))
                       for layer in range(2)]
            receiver.writes_posted(records, None)
        finished_at = time.monotonic()
        receiver.deliver_finish("q", Header(MessageKind.FINISH, 2, 0, 0, 2, num_messages=2, ints=(9,)))
        deadline = time.monotonic() + 1.0
        while "healthy" not in done and time.monotonic() < deadline:
            time.sleep(0.005)
        assert healthy.state is TransferState.DONE and done["healthy"] - finished_at < 0.5, done
        assert "stuck" not in done  # still fenced (until its timeout, 2 s)
        deadline = time.monotonic() + 5.0
        while "stuck" not in done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "stuck" in done  # released once its peer was abandoned
    finally:
        receiver.close()

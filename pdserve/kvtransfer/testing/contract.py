"""The KV transfer contract as scenarios; every transport must pass every one of them.

Each ``check_*`` takes a :class:`~pdserve.kvtransfer.testing.harness.Transport` and raises
``AssertionError`` on a violation. Most use the transport's shared pair (reset to the sentinel first,
and leave no transfer in flight); those about closing or refusing a peer open their own. Destination
caches start filled with :data:`SENTINEL`, source caches with random normal values (partly rewritten
with fresh ones mid-transfer), so "equal to the source" and "kept the sentinel" are exact checks. A *fence* (a small complete transfer on the same channel) proves that every
message sent before it was processed, since a channel is FIFO.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from pdserve.kvtransfer.base import HandshakeError, KVReceiver, TransferHandle, TransferState
from pdserve.kvtransfer.testing.drivers import SenderDriver
from pdserve.kvtransfer.testing.harness import SENTINEL, Pair, ProcessGroupTransport, Transport
from pdserve.kvtransfer.testing.spec import CacheSpec

_transfer_ids = itertools.count(1000)
DEADLINE_S = 30.0


@contextlib.contextmanager
def _shared_pair(transport: Transport) -> Iterator[Pair]:
    """The transport's shared pair, reset to the sentinel; dropped if the scenario fails in it."""
    pair = transport.pair()
    try:
        yield pair
    except BaseException:
        transport.discard_pair()
        raise


def _pick(rng: random.Random, n: int, num_blocks: int, avoid: Iterable[int] = ()) -> list[int]:
    taken = set(avoid)
    return rng.sample([b for b in range(num_blocks) if b not in taken], n)


def sentinel_blocks(pair: Pair) -> set[int]:
    """Destination blocks that still hold the sentinel everywhere (every layer, keys and values)."""
    keep: torch.Tensor | None = None
    for cache in pair.dst:
        flat = (cache == SENTINEL).reshape(2, cache.shape[1], -1).all(dim=2).all(dim=0).cpu()
        keep = flat if keep is None else keep & flat
    assert keep is not None
    return {i for i, kept in enumerate(keep.tolist()) if kept}


def assert_untouched(pair: Pair, written: Iterable[int]) -> None:
    """Every destination block outside ``written`` kept the sentinel."""
    written = set(written)
    changed = set(range(pair.dst[0].shape[1])) - written - sentinel_blocks(pair)
    assert not changed, f"destination blocks {sorted(changed)} were written but belong to no transfer"


def assert_landed(pair: Pair, src: Sequence[int], dst: Sequence[int], indices: Iterable[int]) -> None:
    """Destination ``dst[i]`` equals source ``src[i]`` exactly, in every layer, for each index."""
    indices = list(indices)
    for layer, cache in enumerate(pair.dst):
        expected = pair.sender.source_blocks(layer, [src[i] for i in indices])
        got = cache[:, [dst[i] for i in indices]].cpu()
        assert torch.equal(got, expected), f"layer {layer}: destination blocks differ from the source"


def repoison(pair: Pair, blocks: Sequence[int]) -> None:
    """Fill ``blocks`` with the sentinel again (the decode side reused them)."""
    for cache in pair.dst:
        cache[:, list(blocks)] = SENTINEL


def fence(pair: Pair, rng: random.Random, num_src: int, avoid: Iterable[int]) -> list[int]:
    """A 2-block transfer through the same channel, waited for; returns the blocks it wrote."""
    src, dst = _pick(rng, 2, num_src), _pick(rng, 2, pair.dst[0].shape[1], avoid)
    tid = next(_transfer_ids)
    handle = pair.receiver.expect(tid, f"fence-{tid}", dst, len(pair.dst), DEADLINE_S)
    pair.sender.begin(tid, f"fence-{tid}", dst)
    pair.sender.send_layers(tid, range(len(pair.dst)), src, (0, 2))
    pair.sender.finish(tid, [tid])
    state = pair.receiver.wait(handle, DEADLINE_S)
    assert state is TransferState.DONE, f"fence transfer ended {state}: {handle.error}"
    assert_landed(pair, src, dst, range(2))
    return dst


def check_chunked_transfer(transport: Transport) -> None:
    """Multi-layer, chunked, overlapping re-sends of partial blocks, skipped prefix, payload."""
    spec, rng = transport.spec, random.Random(11)
    with _shared_pair(transport) as pair:
        n, skip = 7, 2
        src, dst = _pick(rng, n, spec.num_src_blocks), _pick(rng, n, spec.num_dst_blocks)
        tid, layers = next(_transfer_ids), range(spec.num_layers)
        handle = pair.receiver.expect(tid, "req-chunked", dst, spec.num_layers, DEADLINE_S)
        pair.sender.begin(tid, "req-chunked", dst, skip)
        pair.sender.send_layers(tid, layers, src, (0, 3))  # chunk 1 ends inside block 2
        pair.sender.rewrite_block(src[2], seed=rng.randrange(1 << 30))  # chunk 2 fills block 2 up
        pair.sender.send_layers(tid, layers, src, (2, 5))
        pair.sender.rewrite_block(src[4], seed=rng.randrange(1 << 30))
        pair.sender.send_layers(tid, layers, src, (4, 7))
        pair.sender.finish(tid, [31337, 7])
        state = pair.receiver.wait(handle, DEADLINE_S)
        assert state is TransferState.DONE, f"transfer ended {state}: {handle.error}"
        assert handle.payload == [31337, 7] and handle.first_token == 31337
        assert 0 < handle.marks["finish_received_at"] <= time.time()
        assert pair.sender.wait(tid, DEADLINE_S) is TransferState.DONE
        assert_landed(pair, src, dst, range(skip, n))
        assert_untouched(pair, dst[skip:])


def check_concurrent_transfers(transport: Transport) -> None:
    """Two transfers interleaved layer by layer on one channel, finished in reverse order."""
    spec, rng = transport.spec, random.Random(12)
    with _shared_pair(transport) as pair:
        src_a, src_b = _pick(rng, 5, spec.num_src_blocks), _pick(rng, 4, spec.num_src_blocks)
        dst_a = _pick(rng, 5, spec.num_dst_blocks)
        dst_b = _pick(rng, 4, spec.num_dst_blocks, avoid=dst_a)
        a, b = next(_transfer_ids), next(_transfer_ids)
        handle_a = pair.receiver.expect(a, "req-a", dst_a, spec.num_layers, DEADLINE_S)
        handle_b = pair.receiver.expect(b, "req-b", dst_b, spec.num_layers, DEADLINE_S)
        pair.sender.begin(a, "req-a", dst_a)
        pair.sender.begin(b, "req-b", dst_b, 1)
        for layer in range(spec.num_layers):
            pair.sender.send_layers(a, [layer], src_a, (0, 5))
            pair.sender.send_layers(b, [layer], src_b, (0, 4))
        pair.sender.finish(b, [2])
        pair.sender.finish(a, [1])
        for handle, payload in ((handle_a, [1]), (handle_b, [2])):
            state = pair.receiver.wait(handle, DEADLINE_S)
            assert state is TransferState.DONE, f"transfer {handle.transfer_id} ended {state}: {handle.error}"
            assert handle.payload == payload
        assert_landed(pair, src_a, dst_a, range(5))
        assert_landed(pair, src_b, dst_b, range(1, 4))
        assert_untouched(pair, dst_a + dst_b[1:])


def check_prepared_steps(transport: Transport) -> None:
    """Three transfers sent through prepared steps (``prepare_step`` / ``send_step_layer``), as a
    prefill worker's forward passes send them: two steps of two blocks each, one transfer skipping its
    first block; each lands exactly, nothing else is written."""
    spec, rng = transport.spec, random.Random(13)
    with _shared_pair(transport) as pair:
        srcs = [_pick(rng, 4, spec.num_src_blocks) for _ in range(3)]
        dsts: list[list[int]] = []
        for _ in range(3):
            dsts.append(_pick(rng, 4, spec.num_dst_blocks, avoid=[b for d in dsts for b in d]))
        ids, skips = [next(_transfer_ids) for _ in range(3)], (0, 1, 0)
        handles = [pair.receiver.expect(t, f"req-{t}", d, spec.num_layers, DEADLINE_S) for t, d in zip(ids, dsts)]
        for t, d, skip in zip(ids, dsts, skips):
            pair.sender.begin(t, f"req-{t}", d, skip)
        for block_range in ((0, 2), (2, 4)):
            pair.sender.send_step([(t, src, block_range) for t, src in zip(ids, srcs)], range(spec.num_layers))
        for i, t in enumerate(ids):
            pair.sender.finish(t, [i])
        for i, handle in enumerate(handles):
            state = pair.receiver.wait(handle, DEADLINE_S)
            assert state is TransferState.DONE, f"transfer {handle.transfer_id} ended {state}: {handle.error}"
            assert handle.payload == [i]
        for src, dst, skip in zip(srcs, dsts, skips):
            assert_landed(pair, src, dst, range(skip, 4))
        assert_untouched(pair, [b for dst, skip in zip(dsts, skips) for b in dst[skip:]])


def check_receiver_cancel_writes_nothing(transport: Transport) -> None:
    """After ``receiver.cancel`` no later message of the transfer writes into its (reused) blocks."""
    spec, rng = transport.spec, random.Random(13)
    with _shared_pair(transport) as pair:
        src, dst = _pick(rng, 4, spec.num_src_blocks), _pick(rng, 4, spec.num_dst_blocks)
        tid = next(_transfer_ids)
        handle = pair.receiver.expect(tid, "req-cancel", dst, spec.num_layers, DEADLINE_S)
        pair.sender.begin(tid, "req-cancel", dst)
        pair.sender.send_layers(tid, [0], src, (0, 4))
        pair.receiver.cancel(handle)
        assert pair.receiver.poll(handle) is TransferState.CANCELLED
        repoison(pair, dst)
        pair.sender.send_layers(tid, range(spec.num_layers), src, (0, 4))
        pair.sender.finish(tid, [5])
        fenced = fence(pair, rng, spec.num_src_blocks, avoid=dst)
        assert pair.receiver.poll(handle) is TransferState.CANCELLED and handle.payload is None
        assert_untouched(pair, fenced)


def check_sender_cancel_fails_receiver(transport: Transport) -> None:
    """``sender.cancel`` reaches the receiver quickly: its handle turns FAILED, not TIMED_OUT."""
    spec, rng = transport.spec, random.Random(14)
    with _shared_pair(transport) as pair:
        src, dst = _pick(rng, 3, spec.num_src_blocks), _pick(rng, 3, spec.num_dst_blocks)
        tid = next(_transfer_ids)
        handle = pair.receiver.expect(tid, "req-sender-cancel", dst, spec.num_layers, DEADLINE_S)
        pair.sender.begin(tid, "req-sender-cancel", dst)
        pair.sender.send_layers(tid, [0], src, (0, 3))
        pair.sender.cancel(tid)
        assert pair.sender.wait(tid, 1.0) is TransferState.CANCELLED
        pair.sender.send_layers(tid, [1], src, (0, 3))  # ignored: the forward pass may still call it
        start = time.monotonic()
        state = pair.receiver.wait(handle, DEADLINE_S)
        assert state is TransferState.FAILED and "cancel" in (handle.error or ""), (state, handle.error)
        assert time.monotonic() - start < 5.0


def _first_layer_sent(receiver: KVReceiver, sender: SenderDriver, rng: random.Random, spec: CacheSpec,
                      request_id: str, deadline_s: float) -> tuple[list[int], list[int], int, TransferHandle]:
    """A 3-block transfer expected by ``receiver`` and begun by ``sender``, only its layer 0 sent:
    ``(source blocks, destination blocks, transfer id, the receiver's handle)``."""
    src, dst = _pick(rng, 3, spec.num_src_blocks), _pick(rng, 3, spec.num_dst_blocks)
    tid = next(_transfer_ids)
    handle = receiver.expect(tid, request_id, dst, spec.num_layers, deadline_s)
    sender.begin(tid, request_id, dst)
    sender.send_layers(tid, [0], src, (0, 3))
    return src, dst, tid, handle


def check_timeout(transport: Transport) -> None:
    """No FINISH within the deadline: TIMED_OUT on time, and late messages write nothing."""
    spec, rng = transport.spec, random.Random(15)
    with _shared_pair(transport) as pair:
        deadline, start = 0.5, time.monotonic()
        src, dst, tid, handle = _first_layer_sent(pair.receiver, pair.sender, rng, spec, "req-timeout", deadline)
        state = pair.receiver.wait(handle, 10.0)
        elapsed = time.monotonic() - start
        assert state is TransferState.TIMED_OUT, (state, handle.error)
        assert deadline * 0.9 <= elapsed < deadline + 2.0, elapsed
        repoison(pair, dst)
        pair.sender.send_layers(tid, range(spec.num_layers), src, (0, 3))
        pair.sender.finish(tid, [9])
        fenced = fence(pair, rng, spec.num_src_blocks, avoid=dst)
        assert pair.receiver.poll(handle) is TransferState.TIMED_OUT
        assert_untouched(pair, fenced)


def check_completion_callbacks(transport: Transport) -> None:
    """``on_terminal`` runs exactly once per transfer, off the caller's thread, after its state is final:
    DONE (with the payload and every byte landed), CANCELLED, TIMED_OUT (on time, nobody polling)."""
    import threading

    spec, rng = transport.spec, random.Random(19)
    seen: dict[str, list[tuple[TransferState, list[int] | None, str]]] = {}
    lock, caller = threading.Lock(), threading.current_thread().name

    def record(handle) -> None:  # noqa: ANN001
        with lock:
            seen.setdefault(handle.request_id, []).append(
                (handle.state, handle.payload, threading.current_thread().name))

    with _shared_pair(transport) as pair:
        src, dst = _pick(rng, 3, spec.num_src_blocks), _pick(rng, 3, spec.num_dst_blocks)
        done_id = next(_transfer_ids)
        pair.receiver.expect(done_id, "cb-done", dst, spec.num_layers, DEADLINE_S, on_terminal=record)
        pair.sender.begin(done_id, "cb-done", dst)
        pair.sender.send_layers(done_id, range(spec.num_layers), src, (0, 3))
        pair.sender.finish(done_id, [4])
        cancel_dst = _pick(rng, 2, spec.num_dst_blocks, avoid=dst)
        cancelled = pair.receiver.expect(next(_transfer_ids), "cb-cancel", cancel_dst, spec.num_layers,
                                         DEADLINE_S, on_terminal=record)
        pair.receiver.cancel(cancelled)
        late_dst = _pick(rng, 2, spec.num_dst_blocks, avoid=dst + cancel_dst)
        start = time.monotonic()
        pair.receiver.expect(next(_transfer_ids), "cb-late", late_dst, spec.num_layers, 0.3, on_terminal=record)
        end = time.monotonic() + 10.0
        while len(seen) < 3 and time.monotonic() < end:
            time.sleep(0.01)
        assert sorted(seen) == ["cb-cancel", "cb-done", "cb-late"], seen
        assert seen["cb-done"][0][:2] == (TransferState.DONE, [4]), seen
        assert seen["cb-cancel"][0][0] is TransferState.CANCELLED
        assert seen["cb-late"][0][0] is TransferState.TIMED_OUT and time.monotonic() - start < 5.0
        assert all(len(calls) == 1 and calls[0][2] != caller for calls in seen.values()), seen
        assert_landed(pair, src, dst, range(3))
        time.sleep(0.05)
        assert all(len(calls) == 1 for calls in seen.values()), "a callback ran twice"


def check_incomplete_transfer_fails(transport: Transport) -> None:
    """A FINISH after a layer never sent: the receiver reports FAILED naming the layer."""
    spec, rng = transport.spec, random.Random(16)
    with _shared_pair(transport) as pair:
        src, dst = _pick(rng, 3, spec.num_src_blocks), _pick(rng, 3, spec.num_dst_blocks)
        tid = next(_transfer_ids)
        handle = pair.receiver.expect(tid, "req-incomplete", dst, spec.num_layers, DEADLINE_S)
        pair.sender.begin(tid, "req-incomplete", dst)
        pair.sender.send_layers(tid, range(spec.num_layers - 1), src, (0, 3))
        pair.sender.finish(tid, [1])
        state = pair.receiver.wait(handle, DEADLINE_S)
        last = spec.num_layers - 1
        assert state is TransferState.FAILED and f"layer {last} never received" in (handle.error or ""), \
            (state, handle.error)


def check_payload_only(transport: Transport) -> None:
    """Every block already cached (skip = all): nothing is written, the payload still arrives."""
    spec, rng = transport.spec, random.Random(17)
    with _shared_pair(transport) as pair:
        src, dst = _pick(rng, 2, spec.num_src_blocks), _pick(rng, 2, spec.num_dst_blocks)
        tid = next(_transfer_ids)
        handle = pair.receiver.expect(tid, "req-cached", dst, spec.num_layers, DEADLINE_S)
        pair.sender.begin(tid, "req-cached", dst, 2)
        pair.sender.send_layers(tid, range(spec.num_layers), src, (0, 2))
        pair.sender.finish(tid, [77])
        assert pair.receiver.wait(handle, DEADLINE_S) is TransferState.DONE, handle.error
        assert handle.payload == [77]
        assert_untouched(pair, ())


def check_bad_arguments_rejected(transport: Transport) -> None:
    """Out-of-range layers and block ranges raise ValueError on the sender; bad expects on the receiver."""
    spec, rng = transport.spec, random.Random(18)
    with _shared_pair(transport) as pair:
        src, dst = _pick(rng, 3, spec.num_src_blocks), _pick(rng, 3, spec.num_dst_blocks)
        tid = next(_transfer_ids)
        handle = pair.receiver.expect(tid, "req-bad", dst, spec.num_layers, DEADLINE_S)
        pair.sender.begin(tid, "req-bad", dst)
        for layers, block_range in (([spec.num_layers], (0, 1)), ([0], (2, 1)), ([0], (0, 4))):
            _expect_error(ValueError, functools.partial(pair.sender.send_layers, tid, layers, src, block_range))
        _expect_error(ValueError, lambda: pair.receiver.expect(tid, "dup", [0], spec.num_layers, 1.0))
        _expect_error(ValueError, lambda: pair.receiver.expect(
            next(_transfer_ids), "oob", [spec.num_dst_blocks], spec.num_layers, 1.0))
        _expect_error(ValueError, lambda: pair.receiver.expect(
            next(_transfer_ids), "twice", [1, 1], spec.num_layers, 1.0))
        pair.sender.cancel(tid)
        pair.receiver.cancel(handle)
        assert_untouched(pair, ())


def check_close_is_prompt(transport: Transport) -> None:
    """Closing either side with a transfer in flight returns promptly and ends the transfer there.

    Receiver first: a pair of its own. Sender first: a second sender into the shared receiver, which
    must go on serving its other sender afterwards.
    """
    spec, rng = transport.spec, random.Random(19)
    pair = transport.open_pair()
    src, dst = _pick(rng, 2, spec.num_src_blocks), _pick(rng, 2, spec.num_dst_blocks)
    tid = next(_transfer_ids)
    handle = pair.receiver.expect(tid, "req-close-receiver", dst, spec.num_layers, DEADLINE_S)
    pair.sender.begin(tid, "req-close-receiver", dst)
    pair.sender.send_layers(tid, [0], src, (0, 2))
    start = time.monotonic()
    pair.receiver.close()
    assert time.monotonic() - start < 2.0, "receiver.close() took too long"
    assert pair.receiver.poll(handle) is TransferState.CANCELLED
    assert pair.sender.close() < 3.0, "sender.close() took too long"

    with _shared_pair(transport) as shared:
        extra = transport.add_sender(shared)
        tid = next(_transfer_ids)
        handle = shared.receiver.expect(tid, "req-close-sender", dst, spec.num_layers, DEADLINE_S)
        extra.sender.begin(tid, "req-close-sender", dst)
        extra.sender.send_layers(tid, [0], src, (0, 2))
        assert extra.sender.close() < 2.0, "sender.close() took too long"
        start = time.monotonic()
        state = shared.receiver.wait(handle, 5.0)
        assert state is TransferState.FAILED, (state, handle.error)
        assert time.monotonic() - start < 5.0
        fenced = fence(shared, rng, spec.num_src_blocks, avoid=dst)
        assert_untouched(shared, set(fenced) | set(dst))


def check_sender_death(transport: ProcessGroupTransport) -> None:
    """A sender whose process is killed mid-transfer (no CANCEL, no close: a prefill worker that dies):
    the receiver ends that transfer FAILED or TIMED_OUT by its deadline, never DONE and never hanging,
    writes nothing more into its blocks, and goes on serving its other sender. Not in :data:`SCENARIOS`:
    it needs senders in processes of their own (:meth:`ProcessGroupTransport.add_mortal_sender`)."""
    spec, rng = transport.spec, random.Random(23)
    with _shared_pair(transport) as shared:
        doomed, host = transport.add_mortal_sender(shared)
        deadline, start = 3.0, time.monotonic()
        try:
            _, dst, _, handle = _first_layer_sent(shared.receiver, doomed.sender, rng, spec, "req-sender-dies",
                                                  deadline)
        finally:
            host.kill()
        state = shared.receiver.wait(handle, deadline + 10.0)
        assert state in (TransferState.FAILED, TransferState.TIMED_OUT), (state, handle.error)
        assert time.monotonic() - start < deadline + 5.0
        repoison(shared, dst)
        fenced = fence(shared, rng, spec.num_src_blocks, avoid=dst)
        assert_untouched(shared, fenced)


def check_layout_mismatch(transport: Transport) -> None:
    """A receiver with another layout is refused with a message naming the field and both values.

    (Two fields here, since every refused receiver costs connections; ``KVLayoutInfo.mismatch`` has
    unit tests for the rest.)
    """
    spec = transport.spec
    mine = spec.layout()
    for name, value in (("block_size", spec.block_size * 2), ("dtype", "float16")):
        try:
            pair = transport.open_pair(spec.layout(**{name: value}))
        except HandshakeError as e:
            expected = f"{name}: this worker has {getattr(mine, name)!r}, the peer has {value!r}"
            assert expected in str(e), f"{str(e)!r} does not say {expected!r}"
            assert e.field == name
        else:
            pair.close()
            raise AssertionError(f"a receiver with another {name} was accepted")


def _expect_error(kind: type[BaseException], call: Callable[[], object]) -> None:
    try:
        call()
    except kind:
        return
    raise AssertionError(f"expected {kind.__name__}")


#: Every scenario, for parametrised test suites.
SCENARIOS = {fn.__name__.removeprefix("check_"): fn for fn in (
    check_chunked_transfer, check_concurrent_transfers, check_prepared_steps, check_receiver_cancel_writes_nothing,
    check_sender_cancel_fails_receiver, check_timeout, check_completion_callbacks,
    check_incomplete_transfer_fails, check_payload_only, check_bad_arguments_rejected, check_close_is_prompt,
    check_layout_mismatch)}

#: Scenarios a one-sided transport (cuda_ipc) does not promise: its receiver cannot stop or inspect the
#: sender's writes, so a receiver-side cancel or timeout does not fence them (the decode worker waits
#: for the sender's cancel acknowledgement instead) and a missing layer is not detected on arrival.
TWO_SIDED_ONLY = frozenset({"receiver_cancel_writes_nothing", "timeout", "incomplete_transfer_fails"})

"""The transport-independent half of every receiver: expected transfers, writes, deadlines, completion.

:class:`ReceiverCore` implements :class:`KVReceiver`; a transport feeds it the messages of each channel
in order through ``deliver_layer`` / ``deliver_finish`` / ``deliver_cancel`` / ``peer_lost``, from any
thread, with the current CUDA stream set to the stream the payload is ready on (its transfer stream).

Write rule: a LAYER payload is written only into the blocks of a transfer that is live (expected, not
terminal, deadline not passed, FINISH not yet seen), and only inside its ``dst_block_ids``; anything
else is received and dropped (counted in ``discarded_messages``). A transport either lands a payload it
already holds (``deliver_layer``: check and scatter under one lock) or, on CUDA, *claims* a part before
its bytes arrive (``claim_part``, under the lock) and *pins* the claimed transfers (``pin_writes``), then
posts the device work that writes them *outside* the lock, and records the event after that work as
their ``last_write`` (``writes_posted``, which unpins). So posting a plan's receives (host time per NCCL
operation) holds up neither other channels' plans nor ``expect``/``poll``/``cancel`` from the worker.

Fences: a transfer that ends other than DONE may still have posted writes in flight, or be pinned (its
writes are being posted). Its blocks are given back only once it is unpinned and its writes finished:
``cancel`` returns, and ``on_terminal`` runs, after the transfer's ``last_write`` completed. If it does not within ``fence_timeout_s`` (a peer that stopped sending in
the middle of announced messages), the transport is told to abandon that peer's writes
(``_abandon_writes``: abort its channel, which ends the posted receives) and the wait goes on briefly.

Completion rule: FINISH makes a transfer DONE if the number of LAYER messages the sender announced
arrived and every layer covers every block index in ``[num_skip_blocks, covered)``; on CUDA, DONE is
reported once the transfer's own ``last_write`` completed -- not the writes of transfers announced after
it on the same stream -- (at once for a one-sided sender, whose FINISH comes after its writes completed). Otherwise the transfer FAILS with a
message saying what was missing.

Completion callbacks: a transfer expected with ``on_terminal`` has it called exactly once, when it
turns terminal, from the receiver's one completion thread (never under the receiver's lock). That
thread sleeps on the condition until something happens: a FINISH (it then waits on the finish
event of the oldest finished transfer, on CUDA, or of any other finished transfer that completes
first), the earliest deadline, or a terminal transition to report. While a transfer is fenced it also
looks at the fence's writes every 1-20 ms (a device event does not notify), and it blocks on a fence
only once that is late (abandoning its peer), so a stalled peer does not delay other transfers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pdserve.kvtransfer.base import KVLayoutInfo, KVReceiver, TransferHandle, TransferState, check_block_ids
from pdserve.kvtransfer.messages import Header, scatter_blocks
from pdserve.kvtransfer.receive_checks import (
    completion_problem,
    layer_header_problem,
    payload_problem,
    range_problem,
)
from pdserve.kvtransfer.streams import Event, event_done, index_tensor, record_event, wait_event

logger = logging.getLogger(__name__)
#: How many finished transfer ids are remembered to refuse their reuse (late messages may still come).
RETIRED_IDS_KEPT = 65536
#: Default for how long an ended transfer waits for its posted writes before its peer's are abandoned.
WRITE_FENCE_TIMEOUT_S = 60.0
#: After abandoning a peer's writes, how much longer to wait for them to stop before giving up.
ABANDON_WAIT_S = 5.0
#: How often the completion thread looks at fenced transfers' writes while nothing else wakes it: every
#: millisecond at first, then a tenth of the time they have taken, at most every 20 ms.
FENCE_POLL_S = 1e-3
FENCE_POLL_MAX_S = 20e-3


@dataclass(eq=False)
class _Incoming:
    handle: TransferHandle
    coverage: list[int] = field(default_factory=list)  # per layer: bit i set = block index i written
    num_messages: int = 0
    last_write: Event = None
    finished: Event | bool = False  # False: no FINISH yet; True (CPU) or an event (CUDA) after it
    on_terminal: Callable[[TransferHandle], None] | None = None
    fence_deadline: float | None = None  # ended with writes in flight: when to abandon them
    pinned: int = 0  # plans posting writes of it outside the lock (pin_writes .. writes_posted)
    settled: bool = False  # its callback was queued (it never is again)
    abandoned: bool = False  # its peer's writes were abandoned (once, whoever waits on its fence)

    def writes_in_flight(self) -> bool:
        return self.pinned > 0 or not event_done(self.last_write)


class ReceiverCore(KVReceiver):
    """:class:`KVReceiver` minus the transport; subclasses deliver messages and implement ``close``."""

    def __init__(self, caches: Sequence[torch.Tensor], layout: KVLayoutInfo,
                 fence_timeout_s: float = WRITE_FENCE_TIMEOUT_S) -> None:
        layout.check_caches(caches)
        self._fence_timeout_s = fence_timeout_s
        self._caches = list(caches)
        self._layout = layout
        self._device = caches[0].device
        self._num_blocks = int(caches[0].shape[1])
        self._cond = threading.Condition(threading.RLock())
        self._records: dict[int, _Incoming] = {}
        self._fencing: list[_Incoming] = []  # ended, waiting for posted writes before their callbacks
        self._retired: OrderedDict[int, None] = OrderedDict()
        self._closed = False
        self.discarded_messages = 0
        self._callbacks: deque[tuple[Callable[[TransferHandle], None], TransferHandle]] = deque()
        self._completions = threading.Thread(target=self._complete, name="kv-receiver-completions", daemon=True)
        self._completions.start()

    @property
    def layout(self) -> KVLayoutInfo:
        return self._layout

    # -- KVReceiver ------------------------------------------------------------------------------------

    def expect(self, transfer_id: int, request_id: str, dst_block_ids: Sequence[int], num_layers: int,
               deadline_s: float, on_terminal: Callable[[TransferHandle], None] | None = None) -> TransferHandle:
        dst = check_block_ids(dst_block_ids, self._num_blocks, "dst_block_ids")
        if len(set(dst)) != len(dst):
            raise ValueError("dst_block_ids holds a block twice")
        if num_layers != self._layout.num_layers:
            raise ValueError(f"num_layers is {num_layers}, the caches have {self._layout.num_layers}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        with self._cond:
            if self._closed:
                raise RuntimeError("this KV receiver is closed")
            if transfer_id in self._records or transfer_id in self._retired:
                raise ValueError(f"transfer id {transfer_id} is in use or was used recently; "
                                 f"transfer ids must be unique per receiver")
            now = time.monotonic()
            handle = TransferHandle(transfer_id=transfer_id, request_id=request_id, peer="",
                                    block_ids=dst, num_layers=num_layers, created_at=now,
                                    deadline_at=now + deadline_s)
            self._records[transfer_id] = _Incoming(handle, [0] * num_layers, on_terminal=on_terminal)
            self._cond.notify_all()  # the completion thread learns the new deadline
            return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._cond:
            record = self._record_of(handle)
            if record is not None:
                self._refresh(record)
            return handle.state

    def wait(self, handle: TransferHandle, timeout: float) -> TransferState:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                record = self._record_of(handle)
                if record is None:
                    break
                self._refresh(record)
                now = time.monotonic()
                if handle.state.is_terminal or now >= end:
                    break
                if record.finished is not False:
                    finished = record.finished
                    self._cond.release()  # wait for the device without holding the lock
                    try:
                        wait_event(finished, end)
                    finally:
                        self._cond.acquire()
                    continue
                wake = min(end, handle.deadline_at or end)
                self._cond.wait(max(0.0, wake - now) + 1e-3)
        self._await_fence(handle)
        return handle.state

    def cancel(self, handle: TransferHandle) -> None:
        """End the transfer; returns once no write of it can land any more (see *Fences*)."""
        with self._cond:
            record = self._record_of(handle)
            if record is not None:
                self._end(record, TransferState.CANCELLED, "cancelled by the receiver")
        self._await_fence(handle)

    # -- for transports --------------------------------------------------------------------------------

    def scratch(self, num_blocks: int) -> torch.Tensor:
        """An uninitialised buffer for a LAYER payload of ``num_blocks`` blocks, on the cache device."""
        return torch.empty(self._layout.payload_shape(num_blocks), dtype=self._layout.torch_dtype,
                           device=self._device)

    def deliver_layer(self, peer: str, header: Header, payload: torch.Tensor) -> None:
        """Scatter a received LAYER payload if its transfer is live, else drop it."""
        with self._cond:
            record = self.claim_part(peer, header, payload)
            if record is None:
                return
            dst = record.handle.block_ids[header.start:header.start + header.num_blocks]
            scatter_blocks(self._caches[header.layer], index_tensor(dst, self._device), payload)
            record.last_write = record_event(self._device)

    def claim_part(self, peer: str, header: Header, payload: torch.Tensor | None = None) -> _Incoming | None:
        """Under the lock: count a LAYER part (its bytes land right after) toward its transfer if that is
        live and the part fits it; ``None`` (dropped, or the transfer failed) otherwise. The caller
        writes ``handle.block_ids[start:start + num_blocks]`` and then sets ``last_write`` before it
        releases the lock, or pins the claimed transfers (:meth:`pin_writes`) before it releases the lock
        and calls :meth:`writes_posted` once their writes are posted. Wakes no waiter unless the transfer
        ends."""
        record = self._records.get(header.transfer_id)
        if record is None or self._closed:
            self.discarded_messages += 1
            return None
        handle = record.handle
        self._refresh(record)
        if handle.state.is_terminal:
            self.discarded_messages += 1
            return None
        handle.peer = handle.peer or peer
        problem = layer_header_problem(self._layout, len(handle.block_ids), record.finished is not False, header)
        if problem is None and payload is not None:
            problem = payload_problem(self._layout, self._device, header, payload)
        if problem is not None:
            self._end(record, TransferState.FAILED, problem)
            return None
        record.coverage[header.layer] |= ((1 << header.num_blocks) - 1) << header.start
        record.num_messages += 1
        # no notify: nothing waits for a part (``wait`` and the completion thread wait for FINISH, a
        # deadline, a fence or a terminal state; ``_end`` notifies those). Notifying per part woke the
        # completion thread once per part on CPU (gloo lands part by part), each time for nothing and
        # competing for the interpreter with the landing thread: 32 wake-ups per 32-layer plan
        handle.state = TransferState.IN_PROGRESS
        return record

    def pin_writes(self, records: Sequence[_Incoming]) -> None:
        """Under the lock, after claiming parts of ``records`` (each once): their writes will be posted
        outside the lock, so until :meth:`writes_posted` unpins them a transfer that ends meanwhile is
        fenced (its blocks are not given back, its callback waits) as if those writes were in flight."""
        for record in records:
            record.pinned += 1
            if record.handle.state.is_terminal and record not in self._fencing:
                # a later part of this plan ended it (its deadline passed, or the part was malformed)
                # after an earlier part was claimed: its callback, queued by ``_end``, must wait for the
                # writes about to be posted (the lock was held since the claims: it has not run)
                self._callbacks = deque(c for c in self._callbacks if c[1] is not record.handle)
                record.settled = False
                self._start_fence(record)

    def writes_posted(self, records: Sequence[_Incoming], event: Event) -> None:
        """After posting the device work that writes claimed parts (under the lock, or after
        :meth:`pin_writes` outside it; pinned records are unpinned): ``event`` (recorded after that work)
        is those transfers' last write."""
        with self._cond:
            ended = False
            for record in records:
                record.last_write = event
                was_pinned = record.pinned > 0
                if was_pinned:
                    record.pinned -= 1
                handle = record.handle
                if not handle.state.is_terminal:
                    continue
                ended = True  # fenced: a fence may be waiting for this unpinning
                if not was_pinned and record not in self._fencing and not record.settled and not event_done(event):
                    # claimed and posted under one lock, unpinned, and ended meanwhile (a later part failed
                    # it): hold its callback back until those writes finished
                    self._callbacks = deque(c for c in self._callbacks if c[1] is not handle)
                    self._start_fence(record)
            if ended:  # (live transfers: nothing waits for their parts, see claim_part)
                self._cond.notify_all()

    @property
    def lock(self) -> threading.Condition:
        """The receiver's lock (a transport holds it from ``claim_part`` to ``pin_writes`` or ``writes_posted``)."""
        return self._cond

    def deliver_finish(self, peer: str, header: Header, written_by_sender: bool = False) -> None:
        """The sender's last message for a transfer: check completeness, keep the payload.

        ``written_by_sender``: a one-sided (cuda_ipc) sender wrote the blocks itself and sends FINISH
        only after its writes completed; no LAYER messages came here, so only the block range is checked.
        """
        with self._cond:
            record = self._records.get(header.transfer_id)
            if record is None or self._closed:
                self.discarded_messages += 1
                return
            handle = record.handle
            self._refresh(record)
            if handle.state.is_terminal or record.finished is not False:
                self.discarded_messages += 1
                return
            handle.peer = handle.peer or peer
            handle.marks["finish_received_at"] = time.time()
            num_expected = len(record.handle.block_ids)
            problem = (range_problem(num_expected, header) if written_by_sender
                       else completion_problem(record.num_messages, record.coverage, num_expected, header))
            if problem is not None:
                self._end(record, TransferState.FAILED, problem)
                return
            handle.payload = list(header.ints)
            # a one-sided sender pushes FINISH once its writes completed: nothing here to wait for (an
            # event on this thread's stream -- the device's default one -- would wait for the engine's
            # steps in flight: 7.6 ms of every handoff on 2xH200). Otherwise the transfer's own last
            # write, not an event recorded now: the landing stream may already carry the receives of
            # later transfers (a prefill worker announces its next step's layers before this FINISH,
            # whose first token waits for that step's launch), and waiting for them cost a whole
            # prefill step (NCCL handoff p90 52 ms against 4 ms over CUDA IPC on 2xH200)
            event = None if written_by_sender else record.last_write
            record.finished = True if event is None else event
            self._refresh(record)
            self._cond.notify_all()

    def deliver_cancel(self, peer: str, header: Header) -> None:
        """The sender gave the transfer up: it fails here (its KV will never be complete)."""
        with self._cond:
            record = self._records.get(header.transfer_id)
            if record is not None and record.finished is False:
                record.handle.peer = record.handle.peer or peer
                self._end(record, TransferState.FAILED, f"the sender {peer} cancelled the transfer")

    def peer_lost(self, peer: str, reason: str) -> None:
        """A channel ended: unfinished transfers that heard from ``peer`` fail with ``reason``."""
        with self._cond:
            for record in list(self._records.values()):
                if record.handle.peer == peer and record.finished is False:
                    self._end(record, TransferState.FAILED, reason)

    def _close_records(self, reason: str) -> None:
        """Refuse further writes and cancel every unfinished transfer (for ``close``); the callbacks run
        on the completion thread, which ends once every fence is settled (see :meth:`_join_completions`)."""
        with self._cond:
            self._closed = True
            for record in list(self._records.values()):
                self._end(record, TransferState.CANCELLED, reason)
            self._cond.notify_all()  # wakes the completion thread even with nothing in flight

    def _join_completions(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until the completion thread ran every callback and stopped."""
        if threading.current_thread() is not self._completions:
            self._completions.join(timeout)

    # -- the completion thread ---------------------------------------------------------------------------

    def _complete(self) -> None:
        """Turn finished transfers DONE once their writes completed, time out the late ones, release
        fenced ones once their writes stopped, and run the callbacks of every transfer that turned
        terminal; until the receiver is closed and nothing is left to report. A fence blocks this thread
        only once it is late (its peer is then abandoned, a few seconds at most): until then its writes
        are checked between other work, so one stalled peer does not hold back the callbacks of
        transfers from the others."""
        while True:
            with self._cond:
                callbacks = self._due_callbacks()
                late: _Incoming | None = None
                finished: _Incoming | None = None
                fences: list[_Incoming] = []
                if not callbacks:
                    for record in list(self._fencing):
                        self._settle_fence(record)
                    callbacks = self._due_callbacks()
                if not callbacks:
                    now = time.monotonic()
                    fences = list(self._fencing)
                    late = next((r for r in fences if r.fence_deadline is not None and now >= r.fence_deadline),
                                None)
                    waiting = [r for r in self._records.values() if r.finished is not False]
                    finished = waiting[0] if waiting else None
                    if late is None and finished is None:
                        if self._closed and not fences:
                            return
                        deadlines = [r.handle.deadline_at for r in self._records.values()
                                     if r.handle.deadline_at is not None]
                        deadlines += [r.fence_deadline for r in fences if r.fence_deadline is not None]
                        wait_s = max(0.0, min(deadlines) - now) + 1e-3 if deadlines else None
                        if fences:  # their writes' completion does not notify: look again soon (less often
                            # the longer they take: a stalled peer's fence waits for its deadline)
                            began = min(r.fence_deadline - self._fence_timeout_s for r in fences
                                        if r.fence_deadline is not None)
                            poll_s = min(FENCE_POLL_MAX_S, max(FENCE_POLL_S, (now - began) / 10))
                            wait_s = poll_s if wait_s is None else min(wait_s, poll_s)
                        self._cond.wait(wait_s)
                        for record in list(self._records.values()):
                            self._refresh(record)
                        continue
            if callbacks:
                for callback, handle in callbacks:
                    try:
                        callback(handle)
                    except Exception:  # noqa: BLE001 - a failing callback must not stop the others
                        logger.exception("KV transfer callback of request %s failed", handle.request_id)
                continue
            if late is not None:
                self._wait_fence(late)
                continue
            assert finished is not None
            if not isinstance(finished.finished, bool):  # wait for the device outside the lock
                others = [r.finished for r in waiting[1:] if not isinstance(r.finished, bool)]
                fenced_writes = [r.last_write for r in fences if not r.pinned]
                first_fence = min((r.fence_deadline for r in fences if r.fence_deadline is not None), default=None)
                until = time.monotonic() + self._fence_timeout_s
                wait_event(finished.finished, until if first_fence is None else min(until, first_fence),
                           should_stop=lambda: any(event_done(e) for e in others + fenced_writes))  # noqa: B023
            with self._cond:
                for record in waiting:
                    if self._records.get(record.handle.transfer_id) is record:
                        self._refresh(record)

    def _due_callbacks(self) -> list[tuple[Callable[[TransferHandle], None], TransferHandle]]:
        due = list(self._callbacks)
        self._callbacks.clear()
        return due

    # -- internals ---------------------------------------------------------------------------------------

    def _record_of(self, handle: TransferHandle) -> _Incoming | None:
        record = self._records.get(handle.transfer_id)
        return record if record is not None and record.handle is handle else None

    def _refresh(self, record: _Incoming) -> None:
        """Apply a finished device write (DONE) or a passed deadline (TIMED_OUT)."""
        handle = record.handle
        if handle.state.is_terminal:
            return
        if record.finished is not False:
            if record.finished is True or event_done(record.finished):
                self._end(record, TransferState.DONE, None)
        elif handle.deadline_at is not None and time.monotonic() > handle.deadline_at:
            self._end(record, TransferState.TIMED_OUT,
                      f"the KV did not arrive within {handle.deadline_at - handle.created_at:.3g} s")

    def _end(self, record: _Incoming, state: TransferState, error: str | None) -> None:
        """Make the transfer terminal; its callback is queued now, or once its posted writes finished."""
        handle = record.handle
        if not handle.state.is_terminal:
            handle.state, handle.error = state, error
            if state is not TransferState.DONE and record.writes_in_flight():
                self._start_fence(record)
            else:
                record.settled = True
                if record.on_terminal is not None:
                    self._callbacks.append((record.on_terminal, handle))
        self._records.pop(handle.transfer_id, None)
        self._retired[handle.transfer_id] = None
        while len(self._retired) > RETIRED_IDS_KEPT:
            self._retired.popitem(last=False)
        self._cond.notify_all()

    def _start_fence(self, record: _Incoming) -> None:
        """Under the lock: hold an ended transfer (and its callback) until its posted writes finished."""
        record.fence_deadline = time.monotonic() + self._fence_timeout_s
        self._fencing.append(record)

    def _settle_fence(self, record: _Incoming, force: bool = False) -> bool:
        """Under the lock: release a fenced transfer whose writes finished (or ``force``); its callback
        is queued. Returns whether it is released."""
        if record not in self._fencing:
            return True
        if not force and record.writes_in_flight():
            return False
        self._fencing.remove(record)
        record.settled = True
        if record.on_terminal is not None:
            self._callbacks.append((record.on_terminal, record.handle))
        self._cond.notify_all()
        return True

    def _wait_fence(self, record: _Incoming) -> None:
        """Outside the lock: wait for a fenced transfer's writes; abandon its peer's writes when they are
        late; then release it."""
        assert record.fence_deadline is not None
        with self._cond:  # writes being posted: their event does not exist yet
            while record.pinned and (left := record.fence_deadline - time.monotonic()) > 0:
                self._cond.wait(left)
        if record.pinned or not wait_event(record.last_write, record.fence_deadline):
            with self._cond:  # the fence may have several waiters (cancel, the completion thread): one aborts
                first, record.abandoned = not record.abandoned, True
            if first:
                logger.warning("the KV writes of transfer %s from %s did not finish within %.3g s; abandoning "
                               "that peer's writes", record.handle.transfer_id, record.handle.peer or "?",
                               self._fence_timeout_s)
                self._abandon_writes(record.handle.peer)
            end = time.monotonic() + ABANDON_WAIT_S
            with self._cond:
                while record.pinned and (left := end - time.monotonic()) > 0:
                    self._cond.wait(left)
            if record.pinned:
                logger.error("the KV writes of transfer %s are still being posted after its peer was abandoned; "
                             "its blocks are given back anyway", record.handle.transfer_id)
            elif not wait_event(record.last_write, end):
                logger.error("the KV writes of transfer %s did not stop; its blocks are given back anyway",
                             record.handle.transfer_id)
        with self._cond:
            self._settle_fence(record, force=True)

    def _await_fence(self, handle: TransferHandle) -> None:
        with self._cond:
            record = next((r for r in self._fencing if r.handle is handle), None)
        if record is not None:
            self._wait_fence(record)

    def _abandon_writes(self, peer: str) -> None:
        """Make the posted writes from ``peer`` finish now (a transport aborts that peer's channel)."""

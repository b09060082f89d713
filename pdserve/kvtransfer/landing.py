"""Landing a plan's messages on the receiver: every receive posted at once, bytes written in place.

One :class:`PlanLanding` per channel of the process-group receiver (built in the channel's thread).
``land(plan)`` handles one PLAN header (:mod:`pdserve.kvtransfer.plan`):

* **CUDA (NCCL).** Under the receiver's lock, claim every message's parts (``ReceiverCore.claim_part``:
  a part of a transfer that is not live is dropped) and pin the claimed transfers (``pin_writes``: one
  that ends meanwhile keeps its blocks until the writes below are posted and finished). Then, outside
  the lock (other channels post their plans, the worker expects and cancels transfers meanwhile), for
  each message in order: post its receives on the *post stream*, which carries nothing else, so NCCL
  runs every receive of the plan back to back; make the *landing stream* (the thread's current stream) wait for them; then either nothing more (a
  split message of one part whose destination blocks are contiguous was received straight into the
  two cache ranges, keys and values) or, from a staging buffer, one scatter launch per layer the
  message carries, for its claimed parts (:func:`~pdserve.kvtransfer.packing.unpack_message`). Messages
  the plan marks as one coalesced launch (:func:`~pdserve.kvtransfer.plan.coalesce_ready`) have their
  receives posted in one coalesced launch too, as NCCL needs, and their scatters follow it. Then
  one event on the landing stream becomes the claimed transfers' ``last_write`` (``writes_posted``,
  which unpins them). The host never waits for a message; it learns that the whole plan landed from
  that event (through the transfers' completion, see :mod:`pdserve.kvtransfer.receiving`).
* **CPU (gloo).** Every receive is posted into staging first, then each message is landed when its
  receives complete, through ``deliver_layer`` (check and scatter under the lock): on the host a late
  check costs nothing and keeps the write rule exact.

Staging buffers of a posted plan stay referenced until its event completed (``retire``), so the caching
allocator cannot hand their memory to a later receive that NCCL runs on its own stream.
``pending()`` says whether posted receives have not finished: a channel that ends with such receives
aborts its group, which ends them.
"""

from __future__ import annotations

import collections
import datetime
import functools
from typing import Any

import torch

from pdserve.kvtransfer.coalescing import can_coalesce, run_coalesced
from pdserve.kvtransfer.messages import ProtocolError, as_bytes, warm_up_block_copies
from pdserve.kvtransfer.packing import unpack_message
from pdserve.kvtransfer.plan import (
    PlannedMessage,
    is_contiguous,
    launches,
    message_buffers,
    part_payloads,
)
from pdserve.kvtransfer.receiving import ReceiverCore
from pdserve.kvtransfer.rendezvous import SENDER_RANK, Group
from pdserve.kvtransfer.streams import Event, NeverDone, event_done, is_cuda, record_event


class PlanLanding:
    """Posts and lands the plans of one channel; used from that channel's thread only."""

    def __init__(self, core: ReceiverCore, peer: str, group: Group, caches: list[torch.Tensor],
                 op_timeout_s: float) -> None:
        self._core, self._peer, self._group, self._caches = core, peer, group, caches
        self._layout = core.layout
        self._device = caches[0].device
        self._timeout = datetime.timedelta(seconds=op_timeout_s)
        self._post_stream = torch.cuda.Stream(self._device) if is_cuda(self._device) else None
        warm_up_block_copies(caches[0])  # the first plan would wait for the scatter kernel's compilation
        self._posted: collections.deque[tuple[Event, list[torch.Tensor]]] = collections.deque()
        self.num_direct = 0  # messages received straight into the cache (no staging, no scatter)
        self.num_staged = 0

    def land(self, plan: list[PlannedMessage]) -> None:
        if self._post_stream is None:
            self._land_on_host(plan)
        else:
            self._retire()
            self._post(plan)

    def pending(self) -> bool:
        """Whether receives this channel posted have not all finished on the device."""
        self._retire()
        return bool(self._posted)

    # -- CUDA ----------------------------------------------------------------------------------------------

    def _post(self, plan: list[PlannedMessage]) -> None:
        assert self._post_stream is not None
        # a message that is not one split part is always staged: its buffer is allocated up front (only a
        # split part's, which may land in place, waits for its claim)
        ready = [None if message.split else message_buffers(message, self._device) for message in plan]
        with self._core.lock:  # only the claims: receives and scatters are posted outside it
            claims = [[self._core.claim_part(self._peer, part) for part in message.parts] for message in plan]
            claimed = list({id(r): r for records in claims for r in records if r is not None}.values())
            self._core.pin_writes(claimed)
        staging: list[torch.Tensor] = []
        event: Event = NeverDone()  # if even the plan's event cannot be recorded: fenced until its timeout
        try:
            self._post_claimed(plan, ready, claims, staging)
        finally:
            # after every receive and scatter this plan posted (also when posting failed half-way: the
            # channel then aborts its group, and the fence waits for what was posted, receives included)
            try:
                torch.cuda.current_stream(self._device).wait_stream(self._post_stream)
                event = record_event(self._device)
            finally:  # never left pinned, even if the event cannot be recorded (the fence then times out,
                # and the channel, whose plan stays pending, aborts its group)
                self._core.writes_posted(claimed, event)
                self._posted.append((event, staging))

    def _post_claimed(self, plan: list[PlannedMessage], ready: list[Any], claims: list[list[Any]],
                      staging: list[torch.Tensor]) -> None:
        """Post the receives of ``plan`` on the post stream and, on the landing stream, wait for them and
        scatter the staged messages into the claimed parts' blocks (``claims``: per message, per part, the
        pinned record or ``None`` for a dropped part, whose bytes are received and not written)."""
        assert self._post_stream is not None
        # per message: where its bytes go, and the staging buffer to scatter (None: received in place)
        landings: list[tuple[PlannedMessage, list[Any], list[torch.Tensor], torch.Tensor | None]] = []
        for message, allocated, records in zip(plan, ready, claims, strict=True):
            targets = [None if r is None else r.handle.block_ids[p.start:p.start + p.num_blocks]
                       for r, p in zip(records, message.parts, strict=True)]
            layer = self._caches[message.parts[0].layer]  # in place: not a view of some heads, on this GPU
            if (message.split and targets[0] is not None and is_contiguous(targets[0])
                    and layer.is_contiguous() and layer.device == self._device):
                part, first = message.parts[0], targets[0][0]
                buffers = [self._caches[part.layer][kv, first:first + part.num_blocks] for kv in (0, 1)]
                landings.append((message, targets, buffers, None))
                self.num_direct += 1
            else:
                staged, buffers = allocated or message_buffers(message, self._device)
                staging.append(staged)
                landings.append((message, targets, buffers, staged))
                self.num_staged += 1
        for launch in launches(plan):
            receives = [functools.partial(self._group.recv, [as_bytes(b)], SENDER_RANK, 0)
                        for i in launch for b in landings[i][2]]
            with torch.cuda.stream(self._post_stream):
                if len(launch) > 1:  # the sender coalesced these messages: so must we (NCCL)
                    if not can_coalesce(self._group):
                        raise ProtocolError("the sender coalesces KV messages and this receiver cannot "
                                            "(an older torch on this side)")
                    works = [run_coalesced(self._group, receives)]
                else:
                    works = [receive() for receive in receives]
            for work in works:
                work.wait()  # the landing stream waits for the receives, the host does not
            for i in launch:
                message, targets, _, staged = landings[i]
                if staged is not None:
                    unpack_message(message, targets, staged, self._caches, self._layout)

    def _retire(self) -> None:
        while self._posted and event_done(self._posted[0][0]):
            self._posted.popleft()

    # -- CPU -----------------------------------------------------------------------------------------------

    def _land_on_host(self, plan: list[PlannedMessage]) -> None:
        posted = []
        for message in plan:
            staged, buffers = message_buffers(message, self._device)
            posted.append((message, staged, [self._group.recv([b], SENDER_RANK, 0) for b in buffers]))
        for message, staged, works in posted:
            for work in works:
                work.wait(self._timeout)
            for part, payload in part_payloads(message, staged, self._layout):
                self._core.deliver_layer(self._peer, part, payload)

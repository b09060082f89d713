"""The prefill side of the process-group transport: one background thread per receiver.

Lifecycle: :func:`open_sender` performs the handshake (layout, backend, pair index; see
:mod:`pdserve.kvtransfer.rendezvous`), starts the thread, which builds the two-rank group and sends a
HELLO message, and returns once that HELLO completed (so the group is up), or raises
:class:`HandshakeError` after ``join_timeout_s``. From then on ``send_layer``/``finish``/``cancel``
append messages to an in-memory queue and return; the thread drains it in order:

* LAYER: take it and the LAYER messages queued behind it as one plan (:mod:`pdserve.kvtransfer.plan`),
  push the PLAN header to the pair's store queue, then per planned message: (CUDA) make the transfer
  stream wait for its layers' events, gather the source blocks (or take them straight from the cache
  when a split message's blocks are contiguous) and ``group.send`` them; on NCCL, messages whose
  layers are already computed when the plan is made go in coalesced launches the plan announces
  (:func:`~pdserve.kvtransfer.plan.coalesce_ready`);
* FINISH / CANCEL: push the header (FINISH carries the completion payload ints); a FINISH is queued
  ahead of later transfers' LAYERs (:func:`finish_position`);
* CLOSE (from :meth:`close`): push it and stop.

Gloo sends complete synchronously (``work.wait(op_timeout)``). NCCL sends are stream-ordered: the
thread records an event after each and keeps at most ``max_inflight_bytes`` of gather buffers in
flight, completing messages in order as their events finish; one not finished within ``op_timeout_s``
breaks the channel. Any channel error turns every live transfer FAILED (``_channel_failed``).
``close()`` cancels live transfers, tells the receiver, and waits at most ``close_timeout_s``.
"""

from __future__ import annotations

import collections
import datetime
import functools
import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pdserve.common import switches
from pdserve.kvtransfer.base import HandshakeError, KVLayoutInfo
from pdserve.kvtransfer.coalescing import COALESCE, can_coalesce, run_coalesced
from pdserve.kvtransfer.factory import process_group_backend, resolve_backend
from pdserve.kvtransfer.messages import (
    Header,
    MessageKind,
    as_bytes,
    gather_blocks,
    warm_up_block_copies,
)
from pdserve.kvtransfer.packing import pack_message
from pdserve.kvtransfer.plan import (
    PlannedMessage,
    coalesce_ready,
    encode_plan,
    group_parts,
    is_contiguous,
    launches,
    message_buffers,
)
from pdserve.kvtransfer.rendezvous import (
    MESSAGE_QUEUE,
    RECEIVER_RANK,
    SENDER_RANK,
    Group,
    channel_context,
    check_peer,
    create_pair_group,
    join_receiver,
    pair_prefix,
    read_receiver,
    shutdown_group,
)
from pdserve.kvtransfer.sealing import SealedQueue, cluster_key
from pdserve.kvtransfer.sending import OutgoingMessage, PreparedStep, SenderCore, finish_position
from pdserve.kvtransfer.streams import (
    Event,
    event_done,
    index_tensor,
    is_cuda,
    record_event,
    spread_problem,
    wait_event,
)

HELLO_NBYTES = 8


#: Plan limits: parts one PLAN header announces, and the bytes of them the receiver has to stage (parts
#: received straight into its cache do not count).
MAX_PLAN_PARTS = 256
MAX_PLAN_STAGED_BYTES = 1 << 30
#: Messages smaller than this take the next layer's parts too (small NCCL messages are slow).
MIN_MESSAGE_BYTES = int(switches.KV_MIN_MESSAGE_BYTES.number())
MAX_MESSAGE_BYTES = int(switches.KV_MAX_MESSAGE_BYTES.number())
#: A lone part at least this large goes as keys + values straight into the receiver's cache. Off by
#: default: on 2xH200 every NCCL operation cost 150-300 us of host time on each side (torch 2.11), more
#: than the scatter a staged message needs, so one operation per message is faster.
MIN_SPLIT_BYTES = int(switches.KV_MIN_SPLIT_BYTES.number())
#: How long a plan may wait for its first layer to be computed while later layers queue up behind it.
PLAN_GATHER_WAIT_S = 2e-3
#: How long a plan whose first layer is computed may still wait for more layers of the forward pass to
#: queue (not once a last layer is queued). Each plan is a wake-up of the receiver's channel thread,
#: which shares its interpreter with the decode loop; many short prompts made one plan per layer. On
#: 2xH200, 1P1D over NCCL on the ShareGPT-like workload (seed 1): attainment at 32 / 48 / 64 req/s per GPU
#: 0.93 / 1.00 / 0.86 without, 1.00 / 0.96 / 1.00 with 4 ms (``PDSERVE_KV_PLAN_EXTRA_WAIT_MS``).
PLAN_EXTRA_WAIT_S = switches.KV_PLAN_EXTRA_WAIT_MS.number() / 1e3


@dataclass(eq=False)
class _InFlight:
    messages: list[OutgoingMessage]
    payloads: list[torch.Tensor]  # kept alive until the sends finished on the device
    event: Event
    deadline: float


class ProcessGroupSender(SenderCore):
    """A :class:`KVSender` over a two-rank gloo/NCCL group; build it with :func:`open_sender`."""

    def __init__(self, bootstrap: Mapping[str, Any], caches: Sequence[torch.Tensor], layout: KVLayoutInfo,
                 *, name: str | None = None, join_timeout_s: float = 60.0, op_timeout_s: float = 60.0,
                 close_timeout_s: float = 5.0, max_inflight_bytes: int = 1 << 30) -> None:
        host, port, group_name = str(bootstrap["host"]), int(bootstrap["port"]), str(bootstrap["group_name"])
        super().__init__(caches, layout, peer=f"{host}:{port}/{group_name}", name=name)
        problem = spread_problem(caches)  # a tensor-parallel worker's: its ranks' blocks go through layer 0's GPU
        if problem is not None:
            raise HandshakeError(problem)
        try:
            self._backend = process_group_backend(resolve_backend(str(bootstrap.get("backend", "auto")),
                                                                  self._device))
        except ValueError as e:
            raise HandshakeError(f"backend: {e}", "backend") from None
        self._op_timeout_s = op_timeout_s
        self._close_timeout_s = close_timeout_s
        self._first_layer = caches[0]  # the block-copy kernel is compiled for its layout at start-up
        self._max_inflight_bytes = max_inflight_bytes
        join = datetime.timedelta(seconds=join_timeout_s)
        self._key = cluster_key()
        index, self._store = self._handshake(host, port, group_name, join)
        prefix = pair_prefix(group_name, index)
        self._messages = SealedQueue(dist.PrefixStore(prefix, self._store), MESSAGE_QUEUE, self._key,
                                     channel_context(group_name, index))
        # one connection serves the handshake, the headers and the group: this side never blocks on it
        self._group_store = dist.PrefixStore(prefix + "/pg", self._store)
        self._group: Group | None = None
        self._queue: collections.deque[OutgoingMessage] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._inflight: collections.deque[_InFlight] = collections.deque()
        self._inflight_bytes = 0
        self._gathering = False  # the thread waits for more layers of a plan (see _take_plan)
        self._done_stream: torch.cuda.Stream | None = None  # where NCCL sends' completion is recorded
        self._ready = threading.Event()
        self._setup_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-sender-{index}", daemon=True)
        self._thread.start()
        if not self._ready.wait(join_timeout_s) or self._setup_error is not None:
            reason = self._setup_error or f"it did not form within {join_timeout_s:g} s"
            self.close()
            raise HandshakeError(f"the {self._backend} process group with the KV receiver at {self.peer} "
                                 f"failed: {reason}")

    def _handshake(self, host: str, port: int, group_name: str, join: datetime.timedelta) -> tuple[int, Any]:
        store, root, info = read_receiver(host, port, group_name, join, self._key)
        # a cuda_ipc receiver also takes NCCL senders (those that cannot map its caches)
        check_peer(self.layout, {self._backend, "cuda_ipc"} if self._backend == "nccl" else self._backend, info)
        return join_receiver(root, self._name, self.layout, self._backend, join, f"{host}:{port} ({group_name!r})",
                             group_name=group_name, key=self._key), store

    # -- SenderCore --------------------------------------------------------------------------------------

    def _submit(self, message: OutgoingMessage) -> None:
        with self._cond:
            if message.header.kind is MessageKind.FINISH:
                self._queue.insert(finish_position(self._queue, message.header.transfer_id), message)
            else:
                self._queue.append(message)
            self._wake(message.header)

    def _submit_layer(self, step: PreparedStep, layer: int, kv_cache_layer: torch.Tensor, ready: Event) -> None:
        """A prepared step's layer of every transfer, queued at once (one wake-up of the thread)."""
        messages = self._layer_messages(step, layer, kv_cache_layer, ready)
        with self._cond:
            self._queue.extend(messages)
            if messages:
                self._wake(messages[-1].header)

    def _wake(self, queued: Header) -> None:
        """Under ``_cond``: wake the thread for what was just queued, unless it is gathering a plan and
        this is a layer before the last (it would only look and wait again, taking the interpreter from
        the forward pass that is queueing the layers: one wake-up per plan, not per layer)."""
        if not self._gathering or queued.kind is not MessageKind.LAYER or queued.layer == self._layout.num_layers - 1:
            self._cond.notify()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            cancelled = self._mark_closed()
        with self._cond:
            self._queue.extend(OutgoingMessage(Header(MessageKind.CANCEL, t)) for t in cancelled)
            self._queue.append(OutgoingMessage(Header(MessageKind.CLOSE)))
            self._cond.notify()
        if self._thread.ident is not None:
            self._thread.join(self._close_timeout_s)
        if self._group is not None:  # NCCL: abort (a communicator's shutdown may wait on its peer)
            shutdown_group(self._group, abort=self._thread.is_alive() or self._backend == "nccl")

    # -- the thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        cuda = is_cuda(self._device)
        stream = torch.cuda.Stream(self._device) if cuda else None
        try:
            if cuda:
                torch.cuda.set_device(self._device)
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                timeout = datetime.timedelta(seconds=self._op_timeout_s)
                self._group = create_pair_group(self._backend, self._group_store, SENDER_RANK, timeout,
                                                f"{self.peer}/{self._name}")
                hello = torch.zeros(HELLO_NBYTES, dtype=torch.uint8, device=self._device)
                self._transmit(OutgoingMessage(Header(MessageKind.HELLO, payload_nbytes=HELLO_NBYTES)), [hello])
                warm_up_block_copies(self._first_layer)
                self._reap(0)
        except Exception as e:  # noqa: BLE001 - reported to open_sender
            self._setup_error = f"{type(e).__name__}: {e}"
            self._ready.set()
            return
        self._ready.set()
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                self._drain()
        except Exception as e:  # noqa: BLE001 - any transport error breaks the channel
            self._channel_failed(f"the KV channel to {self.peer} failed: {type(e).__name__}: {e}")
            if self._group is not None:
                shutdown_group(self._group, abort=True)

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait(5e-4 if self._inflight else None)
                message = self._queue.popleft() if self._queue else None
            self._reap(self._max_inflight_bytes)
            if message is None:
                continue
            kind = message.header.kind
            if kind is MessageKind.CLOSE:
                self._reap(0)
                self._messages.push(message.header.pack())
                return
            if kind in (MessageKind.LAYER, MessageKind.FINISH) and not self._is_live(message.header.transfer_id):
                continue
            if kind is MessageKind.LAYER:
                self._send_plan(self._take_plan(message))
            else:
                self._transmit(message, [])

    def _take_plan(self, first: OutgoingMessage) -> list[OutgoingMessage]:
        """``first`` plus the LAYER messages queued behind it, within the plan limits.

        While ``first``'s layer is still being computed (at most ``PLAN_GATHER_WAIT_S``), the forward
        pass goes on queueing the next layers: waiting lets them join this plan, and costs nothing,
        since no byte of it could go out earlier. Liveness is checked after releasing ``_cond``:
        ``_is_live`` takes the core's lock, which ``send_layer`` holds while it waits for ``_cond``."""
        end = time.monotonic() + PLAN_GATHER_WAIT_S
        while not event_done(first.ready) and time.monotonic() < end:
            time.sleep(5e-5)
        taken, staged = [first], _staged_bytes(first)
        end = time.monotonic() + PLAN_EXTRA_WAIT_S
        with self._cond:
            # woken once the last layer (or anything but a layer) is queued, or at the end of the wait
            self._gathering = True
            while not self._last_layer_queued(first) and (left := end - time.monotonic()) > 0:
                self._cond.wait(left)
            self._gathering = False
            while self._queue and len(taken) < MAX_PLAN_PARTS:
                nxt = self._queue[0]
                if nxt.header.kind is not MessageKind.LAYER or staged + _staged_bytes(nxt) > MAX_PLAN_STAGED_BYTES:
                    break
                taken.append(self._queue.popleft())
                staged += _staged_bytes(nxt)
        return [first] + [m for m in taken[1:] if self._is_live(m.header.transfer_id)]

    def _last_layer_queued(self, first: OutgoingMessage) -> bool:
        """Under ``_cond``: whether the model's last layer is queued (or ``first``), or something other
        than a LAYER: nothing later would join the plan by waiting."""
        newest = self._queue[-1].header if self._queue else first.header
        return newest.kind is not MessageKind.LAYER or newest.layer == self._layout.num_layers - 1

    def _send_plan(self, outgoing: list[OutgoingMessage]) -> None:
        """Announce the messages of ``outgoing`` in one PLAN header, then send them in order, each as
        soon as its layers are computed (on NCCL, messages already computed when the plan is made go
        in coalesced launches the plan announces). Every announced message is sent, even if its
        transfer is cancelled meanwhile: the receiver has posted a receive for it."""
        planned = group_parts([m.header for m in outgoing], lambda i: _splittable(outgoing[i]),
                              MIN_MESSAGE_BYTES, MAX_MESSAGE_BYTES, [event_done(m.ready) for m in outgoing])
        bounds = list(itertools.accumulate((len(m.parts) for m in planned), initial=0))
        parts_of = [outgoing[bounds[i]:bounds[i + 1]] for i in range(len(planned))]
        if COALESCE and is_cuda(self._device) and can_coalesce(self._group):
            ready = [all(event_done(m.ready) for m in parts) for parts in parts_of]
            planned = coalesce_ready(planned, ready, MAX_PLAN_STAGED_BYTES)
        self._messages.push(encode_plan(planned).pack())
        waited: Event = None  # a prepared step's parts of one layer share its event: wait once
        for launch in launches(planned):
            batch = []
            for i in launch:
                self._reap(self._max_inflight_bytes)
                for m in parts_of[i]:
                    if m.ready is not None and m.ready is not waited:
                        torch.cuda.current_stream(self._device).wait_event(m.ready)
                        waited = m.ready
                batch.append((self._payload(planned[i], parts_of[i]), parts_of[i]))
            self._send_batch(batch)

    def _payload(self, message: PlannedMessage, parts: list[OutgoingMessage]) -> list[torch.Tensor]:
        """The tensors that carry ``message``: for a split message keys then values (straight from the
        cache when the source blocks are contiguous), else the parts gathered into one buffer."""
        if message.split:
            (m,) = parts
            assert m.kv_layer is not None
            # (a view of some heads is not contiguous; another rank's layer is gathered onto this GPU)
            if is_contiguous(m.src_block_ids) and m.kv_layer.is_contiguous() and m.kv_layer.device == self._device:
                first = m.src_block_ids[0]
                return [m.kv_layer[kv, first:first + len(m.src_block_ids)] for kv in (0, 1)]
            gathered = gather_blocks(m.kv_layer, index_tensor(m.src_block_ids, self._device))
            return [gathered[0], gathered[1]]
        buffer, _ = message_buffers(message, self._device)
        sources = []
        for m in parts:
            assert m.kv_layer is not None
            sources.append((m.kv_layer, m.src_block_ids))
        pack_message(message, sources, buffer, self._layout)
        return [buffer]

    def _transmit(self, message: OutgoingMessage, payloads: list[torch.Tensor]) -> None:
        """Push ``message``'s header, then send ``payloads`` (HELLO's warm-up bytes; FINISH and CANCEL
        have none) and complete the message."""
        self._mark_pushing(message)
        self._messages.push(message.header.pack())
        self._send(payloads, [message])

    def _send(self, payloads: list[torch.Tensor], done: list[OutgoingMessage]) -> None:
        """Send ``payloads`` in order and complete ``done`` (now on gloo; on NCCL once the sends
        finished on the device, see :meth:`_reap`)."""
        assert self._group is not None
        works = [self._group.send([as_bytes(p)], RECEIVER_RANK, 0) for p in payloads]
        if not is_cuda(self._device):
            for work in works:
                work.wait(datetime.timedelta(seconds=self._op_timeout_s))
            for m in done:
                self._message_done(m)
            return
        self._track(works, payloads, done)

    def _send_batch(self, batch: list[tuple[list[torch.Tensor], list[OutgoingMessage]]]) -> None:
        """Send the messages of one launch of a plan (several: one coalesced NCCL launch)."""
        if len(batch) == 1:
            self._send(*batch[0])
            return
        assert self._group is not None
        group = self._group
        payloads = [p for message_payloads, _ in batch for p in message_payloads]
        work = run_coalesced(group, [functools.partial(group.send, [as_bytes(p)], RECEIVER_RANK, 0)
                                     for p in payloads])
        self._track([work], payloads, [m for _, done in batch for m in done])

    def _track(self, works: list[Any], payloads: list[torch.Tensor], done: list[OutgoingMessage]) -> None:
        """Complete ``done`` once ``works`` finished on the device (:meth:`_reap`). Their completion is
        recorded on a stream of its own: were the transfer stream to wait for a send, the next
        message's gather would start only after it, and gathers and sends would run one after the
        other (measured on 2xH200: 6.8 ms of gathers + 15 ms of sends for 4 GB, back to back)."""
        if self._done_stream is None:
            self._done_stream = torch.cuda.Stream(self._device)
        with torch.cuda.stream(self._done_stream):
            for work in works:
                work.wait()
            event = record_event(self._device)
        deadline = time.monotonic() + self._op_timeout_s
        self._inflight.append(_InFlight(done, payloads, event, deadline))
        self._inflight_bytes += sum(p.numel() * p.element_size() for p in payloads)

    def _reap(self, max_bytes: int) -> None:
        """Complete finished NCCL messages in order; block (bounded) while over ``max_bytes``."""
        while self._inflight:
            oldest = self._inflight[0]
            if not event_done(oldest.event):
                if self._inflight_bytes <= max_bytes and max_bytes > 0:
                    return
                if not wait_event(oldest.event, oldest.deadline):
                    raise TimeoutError(f"a KV message to {self.peer} did not complete within "
                                       f"{self._op_timeout_s:g} s")
            self._inflight.popleft()
            self._inflight_bytes -= sum(p.numel() * p.element_size() for p in oldest.payloads)
            for m in oldest.messages:
                self._message_done(m)


def _splittable(message: OutgoingMessage) -> bool:
    """Whether a part may go as keys + values straight into the receiver's cache (when it is alone)."""
    return message.dst_contiguous and message.header.payload_nbytes >= MIN_SPLIT_BYTES


def _staged_bytes(message: OutgoingMessage) -> int:
    """The bytes of a part the receiver will stage (parts of at least ``MAX_MESSAGE_BYTES`` go alone, so
    a splittable one of that size lands in place)."""
    direct = _splittable(message) and message.header.payload_nbytes >= MAX_MESSAGE_BYTES
    return 0 if direct else message.header.payload_nbytes


def open_sender(bootstrap: Mapping[str, Any], caches: Sequence[torch.Tensor], layout: KVLayoutInfo,
                **options: Any) -> ProcessGroupSender:
    """Connect to the receiver described by ``bootstrap`` (from :func:`open_receiver`).

    ``options``: ``name`` (how the receiver calls this sender), ``join_timeout_s``, ``op_timeout_s``,
    ``close_timeout_s``, ``max_inflight_bytes``. Raises :class:`HandshakeError` when the layouts or
    backends differ, or the receiver cannot be reached or does not join within ``join_timeout_s``.
    """
    return ProcessGroupSender(bootstrap, caches, layout, **options)

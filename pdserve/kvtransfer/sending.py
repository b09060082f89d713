"""The transport-independent half of every sender: argument checks, transfer states, message order.

:class:`SenderCore` implements :class:`KVSender` on top of one primitive a transport provides,
``_submit(message)``, which hands an :class:`OutgoingMessage` to the transport in call order (it must
not block for long: it runs in the forward pass). The transport reports back, in the same order, with
``_message_done(message)`` or ``_channel_failed(error)``; it skips LAYER/FINISH messages whose transfer
``_is_live`` no longer is (cancelled or failed), but always delivers CANCEL and CLOSE.

``prepare_step`` checks the sends of one forward pass once (:class:`PreparedStep`); ``send_step_layer``
then records one event per layer and hands the transport that layer of every live transfer of the step
through ``_submit_layer`` (default: one LAYER message each through ``_submit``; CUDA IPC overrides it
with one copy kernel).

State of a transfer on this side: PENDING at ``begin``, IN_PROGRESS at the first ``send_layer``, DONE
when the transport completed the FINISH message (it completes messages in order, so every LAYER message
before it completed too), CANCELLED on ``cancel``/``close``, FAILED when the channel broke.
"""

from __future__ import annotations

import abc
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pdserve.kvtransfer.base import (
    KVLayoutInfo,
    KVSender,
    LayerSend,
    TransferHandle,
    TransferState,
    check_block_ids,
)
from pdserve.kvtransfer.messages import Header, MessageKind, check_payload_ints
from pdserve.kvtransfer.plan import is_contiguous
from pdserve.kvtransfer.streams import Event, record_event


@dataclass(eq=False)
class OutgoingMessage:
    """A header plus, for LAYER, what the transport needs to gather the payload.

    ``kv_layer`` and ``src_block_ids`` name the source blocks; ``ready`` is the CUDA event recorded
    after the layer was computed (``None`` on CPU): gather only after it completed on the device.
    ``dst_contiguous``: the destination blocks of this range are consecutive ids (a receiver can take
    them straight into its cache).
    """

    header: Header
    kv_layer: torch.Tensor | None = None
    src_block_ids: tuple[int, ...] = ()
    ready: Event = None
    dst_contiguous: bool = False


@dataclass(eq=False)
class SenderRecord:
    """A live transfer on this side: its handle, LAYER messages submitted so far, the highest block
    index they covered, and whether FINISH was called."""

    handle: TransferHandle
    num_submitted: int = 0
    max_end: int = 0
    finishing: bool = False
    contiguous: dict[tuple[int, int], bool] = field(default_factory=dict)  # per block range (every layer asks)


@dataclass(frozen=True, eq=False)
class StepEntry:
    """One transfer's blocks ``[start, end)`` in a prepared step (``src``: their source block ids)."""

    record: SenderRecord
    start: int
    end: int
    src: tuple[int, ...]

    @property
    def dst(self) -> tuple[int, ...]:
        return self.record.handle.block_ids[self.start:self.end]


class PreparedStep:
    """The checked sends of one forward pass (:meth:`SenderCore.prepare_step`). ``generation``: the
    sender's generation when the entries were last checked against its live transfers."""

    def __init__(self, entries: list[StepEntry], generation: int) -> None:
        self.generation = generation
        self.keep(entries)

    def keep(self, entries: list[StepEntry]) -> None:
        """Send only ``entries`` from now on (the others' transfers ended)."""
        self.entries = entries


class SenderCore(KVSender):
    """:class:`KVSender` minus the transport; subclasses implement ``_submit`` and ``close``."""

    def __init__(self, caches: Sequence[torch.Tensor], layout: KVLayoutInfo, peer: str,
                 name: str | None = None) -> None:
        layout.check_caches(caches)
        #: how the receiver calls this sender (its logs and errors); unique per process by default
        self._name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._layout = layout
        #: where "ready" events are recorded: layer 0's device (a tensor-parallel worker's rank 0, whose
        #: stream passes a layer's all-reduce only after every rank wrote that layer's KV)
        self._device = caches[0].device
        self._layer_devices = [cache.device for cache in caches]
        self._num_blocks = int(caches[0].shape[1])
        self._peer = peer
        self._lock = threading.RLock()
        self._records: dict[int, SenderRecord] = {}
        self._closed = False
        self._broken: str | None = None
        self._last_checked_src: tuple[int, ...] = ()
        #: bumped whenever a transfer ends: a prepared step re-checks which of its transfers still live
        self._generation = 0

    @property
    def layout(self) -> KVLayoutInfo:
        return self._layout

    @property
    def peer(self) -> str:
        return self._peer

    # -- transport primitive -------------------------------------------------------------------------

    @abc.abstractmethod
    def _submit(self, message: OutgoingMessage) -> None:
        """Hand ``message`` to the transport (called in order, under the sender's lock)."""

    # -- KVSender ------------------------------------------------------------------------------------

    def begin(self, transfer_id: int, request_id: str, dst_block_ids: Sequence[int],
              num_skip_blocks: int = 0) -> TransferHandle:
        dst = check_block_ids(dst_block_ids, 2 ** 62, "dst_block_ids")
        if not 0 <= num_skip_blocks <= len(dst):
            raise ValueError(f"num_skip_blocks must lie in [0, {len(dst)}], got {num_skip_blocks}")
        with self._lock:
            self._check_open()
            if transfer_id in self._records:
                raise ValueError(f"transfer {transfer_id} is already in progress on this sender")
            handle = TransferHandle(transfer_id=transfer_id, request_id=request_id, peer=self._peer,
                                    block_ids=dst, num_layers=self._layout.num_layers,
                                    num_skip_blocks=num_skip_blocks)
            if self._broken is not None:
                handle.state, handle.error = TransferState.FAILED, self._broken
            else:
                self._records[transfer_id] = SenderRecord(handle)
            return handle

    def send_layer(self, handle: TransferHandle, layer: int, kv_cache_layer: torch.Tensor,
                   src_block_ids: Sequence[int], block_range: tuple[int, int]) -> None:
        self._check_layer(layer, kv_cache_layer)
        checked = self._checked_range(handle, src_block_ids, block_range)
        if checked is None:
            return
        start, end, src = checked
        header = Header(MessageKind.LAYER, handle.transfer_id, layer, start, end - start,
                        self._layout.payload_nbytes(end - start))
        with self._lock:
            record = self._live_record(handle, "send_layer")
            if record is None:
                return
            self._count_layer(record, end)
            self._submit(OutgoingMessage(header, kv_cache_layer, src, record_event(self._device),
                                         self._contiguous(record, start, end)))

    def prepare_step(self, sends: Sequence[LayerSend]) -> PreparedStep:
        entries = []
        with self._lock:
            for send in sends:
                checked = self._checked_range(send.handle, send.src_block_ids, send.block_range)
                record = self._live_record(send.handle, "prepare_step")
                if checked is None or record is None:
                    continue
                if record.finishing:
                    raise ValueError(f"send_layer after finish for transfer {send.handle.transfer_id}")
                entries.append(StepEntry(record, *checked))
            return self._new_step(entries)

    def send_step_layer(self, step: PreparedStep, layer: int, kv_cache_layer: torch.Tensor) -> None:
        self._check_layer(layer, kv_cache_layer)
        ready = record_event(self._device)
        with self._lock:
            self._check_open()
            if step.generation != self._generation:  # a transfer ended: send nothing more of it
                live = [e for e in step.entries if self._records.get(e.record.handle.transfer_id) is e.record]
                if len(live) != len(step.entries):
                    step.keep(live)
                step.generation = self._generation
            if not step.entries:
                return
            for entry in step.entries:
                self._count_layer(entry.record, entry.end)
            self._submit_layer(step, layer, kv_cache_layer, ready)

    def _new_step(self, entries: list[StepEntry]) -> PreparedStep:
        """The prepared step of ``entries`` (transports that keep more per step return a subclass)."""
        return PreparedStep(entries, self._generation)

    def _submit_layer(self, step: PreparedStep, layer: int, kv_cache_layer: torch.Tensor, ready: Event) -> None:
        """Under the lock: hand the transport ``layer`` of every entry of ``step`` (``ready``: recorded
        after the layer was computed). Default: one LAYER message per entry, in order."""
        for message in self._layer_messages(step, layer, kv_cache_layer, ready):
            self._submit(message)

    def _layer_messages(self, step: PreparedStep, layer: int, kv_cache_layer: torch.Tensor,
                        ready: Event) -> list[OutgoingMessage]:
        """The LAYER messages of ``layer`` for every entry of ``step``, in order."""
        messages = []
        for entry in step.entries:
            record, start, end = entry.record, entry.start, entry.end
            header = Header(MessageKind.LAYER, record.handle.transfer_id, layer, start, end - start,
                            self._layout.payload_nbytes(end - start))
            messages.append(OutgoingMessage(header, kv_cache_layer, entry.src, ready,
                                            self._contiguous(record, start, end)))
        return messages

    # -- argument checks and bookkeeping shared with batched sends ---------------------------------

    @staticmethod
    def _contiguous(record: SenderRecord, start: int, end: int) -> bool:
        contiguous = record.contiguous.get((start, end))
        if contiguous is None:
            contiguous = record.contiguous[(start, end)] = is_contiguous(record.handle.block_ids[start:end])
        return contiguous

    def _check_layer(self, layer: int, kv_cache_layer: torch.Tensor) -> None:
        if not 0 <= layer < self._layout.num_layers:
            raise ValueError(f"layer must lie in [0, {self._layout.num_layers}), got {layer}")
        if kv_cache_layer.device != self._layer_devices[layer]:
            raise ValueError(f"kv_cache_layer is on {kv_cache_layer.device}, this sender's layer {layer} on "
                             f"{self._layer_devices[layer]}")
        self._layout.check_layer(kv_cache_layer, "kv_cache_layer")

    def _checked_range(self, handle: TransferHandle, src_block_ids: Sequence[int],
                       block_range: tuple[int, int]) -> tuple[int, int, tuple[int, ...]] | None:
        """``(start, end, source ids)`` of the blocks to send (``None``: all below ``num_skip_blocks``),
        or ``ValueError``."""
        start, end = block_range
        num_dst = len(handle.block_ids)
        if not 0 <= start <= end <= min(num_dst, len(src_block_ids)):
            raise ValueError(f"block_range {block_range} must satisfy 0 <= start <= end <= "
                             f"min(len(dst_block_ids)={num_dst}, len(src_block_ids)={len(src_block_ids)})")
        start = max(start, handle.num_skip_blocks)
        if start >= end:
            return None
        src = tuple(src_block_ids[start:end])
        if src != self._last_checked_src:  # every layer of a chunk sends the same blocks: check once
            check_block_ids(src, self._num_blocks, "src_block_ids")
            self._last_checked_src = src
        return start, end, src

    def _count_layer(self, record: SenderRecord, end: int) -> None:
        """Under the lock: one more LAYER message of ``record``'s transfer, covering blocks below ``end``."""
        if record.finishing:
            raise ValueError(f"send_layer after finish for transfer {record.handle.transfer_id}")
        record.num_submitted += 1
        record.max_end = max(record.max_end, end)
        if record.handle.state is TransferState.PENDING:
            record.handle.state = TransferState.IN_PROGRESS

    def finish(self, handle: TransferHandle, payload: Sequence[int]) -> None:
        ints = check_payload_ints(payload)
        with self._lock:
            record = self._live_record(handle, "finish")
            if record is None:
                return
            if record.finishing:
                raise ValueError(f"finish called twice for transfer {handle.transfer_id}")
            record.finishing = True
            handle.marks["finish_called_at"] = time.time()
            if handle.state is TransferState.PENDING:
                handle.state = TransferState.IN_PROGRESS
            header = Header(MessageKind.FINISH, handle.transfer_id, start=handle.num_skip_blocks,
                            num_blocks=record.max_end, num_messages=record.num_submitted, ints=ints)
            self._submit(OutgoingMessage(header))

    def poll(self, handle: TransferHandle) -> TransferState:
        return handle.state

    def cancel(self, handle: TransferHandle) -> None:
        with self._lock:
            record = self._records.get(handle.transfer_id)
            if record is None or record.handle is not handle or handle.state.is_terminal:
                return
            self._end(record, TransferState.CANCELLED, "cancelled by the sender")
            if not self._closed and self._broken is None:
                self._submit(OutgoingMessage(Header(MessageKind.CANCEL, handle.transfer_id)))

    # -- for transports --------------------------------------------------------------------------------

    def _is_live(self, transfer_id: int) -> bool:
        """Whether LAYER/FINISH messages of ``transfer_id`` should still go out."""
        with self._lock:
            return transfer_id in self._records

    def _mark_pushing(self, message: OutgoingMessage) -> None:
        """Transports call this right before a message's header leaves: stamps a FINISH's push."""
        if message.header.kind is MessageKind.FINISH:
            with self._lock:
                record = self._records.get(message.header.transfer_id)
                if record is not None:
                    record.handle.marks["finish_pushed_at"] = time.time()

    def _message_done(self, message: OutgoingMessage) -> None:
        """The transport completed ``message``; a completed FINISH makes its transfer DONE."""
        if message.header.kind is not MessageKind.FINISH:
            return
        with self._lock:
            record = self._records.get(message.header.transfer_id)
            if record is not None and record.finishing:
                self._end(record, TransferState.DONE, None)

    def _channel_failed(self, error: str) -> None:
        """The channel broke: every live transfer fails, later ``begin`` calls return FAILED handles."""
        with self._lock:
            if self._broken is None:
                self._broken = error
            for record in list(self._records.values()):
                self._end(record, TransferState.FAILED, error)

    def _mark_closed(self) -> list[int]:
        """Refuse new work and cancel live transfers; returns their ids (to tell the receiver)."""
        with self._lock:
            self._closed = True
            ids = list(self._records)
            for record in list(self._records.values()):
                self._end(record, TransferState.CANCELLED, "the sender was closed")
            return ids

    # -- internals ---------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this KV sender is closed")

    def _live_record(self, handle: TransferHandle, what: str) -> SenderRecord | None:
        self._check_open()
        record = self._records.get(handle.transfer_id)
        if record is None or record.handle is not handle:
            if handle.state.is_terminal:
                return None  # cancelled or failed meanwhile: the forward pass just goes on
            raise ValueError(f"{what}: transfer {handle.transfer_id} was not begun on this sender")
        return record

    def _end(self, record: SenderRecord, state: TransferState, error: str | None) -> None:
        handle = record.handle
        self._generation += 1
        if not handle.state.is_terminal:
            handle.state, handle.error = state, error
        self._records.pop(handle.transfer_id, None)


def finish_position(queue: Sequence[OutgoingMessage], transfer_id: int) -> int:
    """Where a transfer's FINISH joins the queue: right after the last message of that transfer still
    queued (the receiver must have its LAYERs announced first), ahead of the LAYERs of later transfers
    queued since, never ahead of another control message. A prefill worker queues its next step's layers
    before the previous prompt's FINISH (whose first token waits for that step's launch): behind them, the
    FINISH waited for their announcement and sends, up to the whole next forward pass."""
    for index in range(len(queue) - 1, -1, -1):
        header = queue[index].header
        if header.transfer_id == transfer_id or header.kind is not MessageKind.LAYER:
            return index + 1
    return 0

"""The prefill side of the CUDA IPC transport: one-sided writes into a decode worker's mapped cache.

Lifecycle: :func:`open_ipc_sender` reads the receiver's published info, maps its exported caches
(:func:`~pdserve.kvtransfer.cuda_ipc.map_caches`; :class:`IpcUnavailable` if it cannot, before joining,
so the caller can fall back to NCCL), joins the receiver as a ``cuda_ipc`` sender and starts a
notifier thread. Then per transfer:

* ``send_layer`` (engine thread, inside the forward pass): the sender's copy stream waits for the
  layer's event and the block-copy kernel stores the blocks into the peer's cache. Nothing is queued
  and no other thread is involved: the cost is one kernel launch per layer and chunk.
  ``prepare_step`` + ``send_step_layer`` do the same for every transfer of a forward pass with one
  kernel launch per layer (``_submit_layer``): arguments are checked and the block ids of all the
  step's transfers concatenated once per step, so a step of dozens of short prompts costs the host what one prompt does
  (per-layer-and-prompt launches cost a prefill worker tens of ms per step under many short prompts).
* ``finish``: an event is recorded after the transfer's last copy; the notifier thread waits for it,
  then pushes FINISH (with the first token) to the pair's store queue and marks the transfer DONE.
  The receiver admits the request when that FINISH arrives: every byte has landed by then.
* A tensor-parallel worker (either side) lists one transfer layer per rank's layer, or per view of
  some of its KV heads when the degrees differ, on several GPUs: layer ``i``'s copies launch on the GPU
  its destination is mapped for (:func:`~pdserve.kvtransfer.cuda_ipc.map_caches`; the sender's own layer
  ``i`` GPU unless a view of the same receiver allocation was mapped on another), on that GPU's copy
  stream, after the layer's event (recorded on layer 0's GPU: rank 0's stream passes a layer's
  all-reduce only once every rank wrote its KV); a transfer's FINISH waits for its copies on every GPU.
* ``cancel`` (and ``close``): no copy is launched for the transfer afterwards, and the call returns
  only once the copies already launched completed (bounded by ``op_timeout_s``). The receiver cannot
  fence one-sided writes itself, so the decode worker frees a cancelled transfer's blocks only after
  this sender acknowledged the cancel (the ``CancelPrefill`` call), or after its own grace period.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from pdserve.kvtransfer.base import KVLayoutInfo
from pdserve.kvtransfer.block_copy import copy_blocks
from pdserve.kvtransfer.cuda_ipc import IpcUnavailable, map_caches
from pdserve.kvtransfer.messages import Header, MessageKind, warm_up_block_copies
from pdserve.kvtransfer.rendezvous import (
    MESSAGE_QUEUE,
    channel_context,
    check_peer,
    join_receiver,
    pair_prefix,
    read_receiver,
)
from pdserve.kvtransfer.sealing import SealedQueue, cluster_key
from pdserve.kvtransfer.sending import OutgoingMessage, PreparedStep, SenderCore, StepEntry
from pdserve.kvtransfer.streams import (
    Event,
    enable_peer_access,
    index_tensor,
    is_cuda,
    record_event,
    wait_event,
)

logger = logging.getLogger(__name__)
_STOP = object()


class _StepCopy(PreparedStep):
    """A prepared step plus the concatenated block ids of all its entries (index tensors made on first
    use, on each writing device's copy stream): one copy kernel per layer moves every transfer's blocks."""

    def keep(self, entries: list[StepEntry]) -> None:
        super().keep(entries)
        self.src: tuple[int, ...] = tuple(i for e in entries for i in e.src)
        self.dst: tuple[int, ...] = tuple(i for e in entries for i in e.dst)
        self.tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


class IpcSender(SenderCore):
    """A :class:`KVSender` that writes into the receiver's caches; build it with :func:`open_ipc_sender`.

    ``remote_caches`` replaces the mapping (tests on CPU pass the receiver's own tensors)."""

    def __init__(self, bootstrap: Mapping[str, Any], caches: Sequence[torch.Tensor], layout: KVLayoutInfo,
                 *, name: str | None = None, join_timeout_s: float = 60.0, op_timeout_s: float = 60.0,
                 close_timeout_s: float = 5.0, remote_caches: Sequence[torch.Tensor] | None = None,
                 **_: Any) -> None:
        host, port, group_name = str(bootstrap["host"]), int(bootstrap["port"]), str(bootstrap["group_name"])
        super().__init__(caches, layout, peer=f"{host}:{port}/{group_name}", name=name)
        self._op_timeout_s = op_timeout_s
        self._close_timeout_s = close_timeout_s
        join = datetime.timedelta(seconds=join_timeout_s)
        key = cluster_key()
        store, root, info = read_receiver(host, port, group_name, join, key)
        check_peer(layout, str(info.get("backend")), info)  # protocol and layout; the verdict decides the rest
        self._remote = list(remote_caches) if remote_caches is not None else map_caches(
            info.get("ipc"), layout, self._layer_devices)
        #: layer i's copies launch on the device its destination is mapped for, reading the source layer
        #: over peer access when that sits on another GPU of this process (a tensor-parallel worker)
        self._writers = [remote.device for remote in self._remote]
        if not enable_peer_access([*self._writers, *self._layer_devices]):
            raise IpcUnavailable("this worker's GPUs cannot read each other's memory")
        _load_copy_kernels(caches, self._writers)
        index = join_receiver(root, self._name, layout, "cuda_ipc", join, self.peer, group_name=group_name, key=key)
        self._messages = SealedQueue(dist.PrefixStore(pair_prefix(group_name, index), store), MESSAGE_QUEUE, key,
                                     channel_context(group_name, index))
        self._streams = {device: torch.cuda.Stream(device) for device in self._writers if is_cuda(device)}
        #: per live transfer, the event after its last copy launched on each writing device
        self._last_write: dict[int, dict[torch.device, Event]] = {}
        self._notices: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._notify, name=f"kv-ipc-notify-{index}", daemon=True)
        self._thread.start()

    # -- SenderCore ------------------------------------------------------------------------------------

    def _submit(self, message: OutgoingMessage) -> None:
        """Under the core's lock, in call order: copy a LAYER now; hand FINISH/CANCEL to the notifier."""
        header = message.header
        if header.kind is MessageKind.LAYER:
            assert message.kv_layer is not None
            record = self._records[header.transfer_id]
            dst = record.handle.block_ids[header.start:header.start + header.num_blocks]
            writer = self._writers[header.layer]
            try:
                with self._copy_stream(writer, message.ready):
                    copy_blocks(message.kv_layer, self._remote[header.layer],
                                index_tensor(message.src_block_ids, writer), index_tensor(dst, writer))
                    self._last_write.setdefault(header.transfer_id, {})[writer] = record_event(writer)
            except Exception as e:  # noqa: BLE001 - a failed launch breaks the channel
                self._channel_failed(f"writing KV into {self.peer} failed: {type(e).__name__}: {e}")
            return
        fences = self._last_write.pop(header.transfer_id, {}) if header.kind is MessageKind.FINISH else {}
        self._notices.put((message, list(fences.values())))

    @contextmanager
    def _copy_stream(self, writer: torch.device, ready: Event) -> Iterator[None]:
        """``writer`` current, its copy stream current on it, after ``ready`` (nothing on the CPU)."""
        stream = self._streams.get(writer)
        if stream is None:
            yield
            return
        with torch.cuda.device(writer), torch.cuda.stream(stream):
            if ready is not None:
                stream.wait_event(ready)
            yield

    def _new_step(self, entries: list[StepEntry]) -> PreparedStep:
        return _StepCopy(entries, self._generation)

    def _submit_layer(self, step: PreparedStep, layer: int, kv_cache_layer: torch.Tensor, ready: Event) -> None:
        """One block-copy kernel for every live transfer of ``step`` (see the module)."""
        assert isinstance(step, _StepCopy)
        writer = self._writers[layer]
        try:
            with self._copy_stream(writer, ready):
                ids = step.tensors.get(writer)
                if ids is None:
                    ids = step.tensors[writer] = (index_tensor(step.src, writer), index_tensor(step.dst, writer))
                copy_blocks(kv_cache_layer, self._remote[layer], *ids)
                written = record_event(writer)
        except Exception as e:  # noqa: BLE001 - a failed launch breaks the channel
            self._channel_failed(f"writing KV into {self.peer} failed: {type(e).__name__}: {e}")
            return
        for entry in step.entries:
            self._last_write.setdefault(entry.record.handle.transfer_id, {})[writer] = written

    def cancel(self, handle: Any) -> None:
        """Cancel, then wait (bounded) until the transfer's launched copies completed."""
        with self._lock:
            super().cancel(handle)
            fences = self._last_write.pop(handle.transfer_id, {})
        self._fence(list(fences.values()))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            cancelled = self._mark_closed()
            fences = [event for events in self._last_write.values() for event in events.values()]
            self._last_write.clear()
        self._fence(fences)
        for tid in cancelled:
            self._notices.put((OutgoingMessage(Header(MessageKind.CANCEL, tid)), []))
        self._notices.put((OutgoingMessage(Header(MessageKind.CLOSE)), []))
        self._notices.put(_STOP)
        self._thread.join(self._close_timeout_s)
        self._remote = []  # unmaps the peer's caches once the last copy referencing them is gone

    def _channel_failed(self, error: str) -> None:
        super()._channel_failed(error)
        self._last_write.clear()

    # -- the notifier thread ---------------------------------------------------------------------------

    def _fence(self, events: list[Event]) -> None:
        deadline = time.monotonic() + self._op_timeout_s
        if not all(wait_event(event, deadline) for event in events):
            logger.error("KV writes into %s did not complete within %g s", self.peer, self._op_timeout_s)

    def _notify(self) -> None:
        while True:
            item = self._notices.get()
            if item is _STOP:
                return
            message, fences = item
            try:
                if message.header.kind is MessageKind.FINISH:
                    for fence in fences:
                        if fence is not None:
                            fence.synchronize()  # releases the GIL; the copies are short
                    if not self._is_live(message.header.transfer_id):
                        continue
                self._mark_pushing(message)
                self._messages.push(message.header.pack())
                self._message_done(message)
            except Exception as e:  # noqa: BLE001 - the store went away: the channel is broken
                self._channel_failed(f"the KV channel to {self.peer} failed: {type(e).__name__}: {e}")
                if message.header.kind is MessageKind.CLOSE:
                    return


def _load_copy_kernels(caches: Sequence[torch.Tensor], writers: Sequence[torch.device]) -> None:
    """Compile and load the block copy on every writing GPU now, launched there on the first layer it will
    copy (:func:`~pdserve.kvtransfer.messages.warm_up_block_copies`). Loading a kernel waits for the GPU's
    running kernels: from the engine thread, inside a forward pass, a first copy on a GPU where another
    tensor-parallel rank's all-reduce kernel spins for rank 0 (whose next launch waits for this thread)
    would never return."""
    first_layer: dict[torch.device, int] = {}
    for index, writer in enumerate(writers):
        first_layer.setdefault(writer, index)
    for writer, index in first_layer.items():
        if is_cuda(writer):
            with torch.cuda.device(writer):
                warm_up_block_copies(caches[index])
                torch.cuda.synchronize(writer)


def open_ipc_sender(bootstrap: Mapping[str, Any], caches: Sequence[torch.Tensor], layout: KVLayoutInfo,
                    **options: Any) -> IpcSender:
    """Map the receiver's caches and join it as a ``cuda_ipc`` sender (options as for ``open_sender``).

    Raises :class:`IpcUnavailable` when the caches cannot be mapped here (the caller may fall back to
    NCCL), :class:`HandshakeError` when the receiver refuses or cannot be reached."""
    return IpcSender(bootstrap, caches, layout, **options)


__all__ = ["IpcSender", "IpcUnavailable", "open_ipc_sender"]

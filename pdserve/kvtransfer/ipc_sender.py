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
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist

from pdserve.kvtransfer.base import KVLayoutInfo
from pdserve.kvtransfer.block_copy import copy_blocks
from pdserve.kvtransfer.cuda_ipc import IpcUnavailable, map_caches
from pdserve.kvtransfer.messages import Header, MessageKind
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
from pdserve.kvtransfer.streams import Event, index_tensor, is_cuda, record_event, wait_event

logger = logging.getLogger(__name__)
_STOP = object()


class _StepCopy(PreparedStep):
    """A prepared step plus the concatenated block ids of all its entries (index tensors made on first
    use, on the copy stream): one copy kernel per layer moves every transfer's blocks."""

    def keep(self, entries: list[StepEntry]) -> None:
        super().keep(entries)
        self.src: tuple[int, ...] = tuple(i for e in entries for i in e.src)
        self.dst: tuple[int, ...] = tuple(i for e in entries for i in e.dst)
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None


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
            info.get("ipc"), layout, self._device)
        index = join_receiver(root, self._name, layout, "cuda_ipc", join, self.peer, group_name=group_name, key=key)
        self._messages = SealedQueue(dist.PrefixStore(pair_prefix(group_name, index), store), MESSAGE_QUEUE, key,
                                     channel_context(group_name, index))
        self._stream = torch.cuda.Stream(self._device) if is_cuda(self._device) else None
        self._last_write: dict[int, Event] = {}
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
            try:
                with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
                    if message.ready is not None and self._stream is not None:
                        self._stream.wait_event(message.ready)
                    copy_blocks(message.kv_layer, self._remote[header.layer],
                                index_tensor(message.src_block_ids, self._device), index_tensor(dst, self._device))
                    self._last_write[header.transfer_id] = record_event(self._device)
            except Exception as e:  # noqa: BLE001 - a failed launch breaks the channel
                self._channel_failed(f"writing KV into {self.peer} failed: {type(e).__name__}: {e}")
            return
        fence = self._last_write.pop(header.transfer_id, None) if header.kind is MessageKind.FINISH else None
        self._notices.put((message, fence))

    def _new_step(self, entries: list[StepEntry]) -> PreparedStep:
        return _StepCopy(entries, self._generation)

    def _submit_layer(self, step: PreparedStep, layer: int, kv_cache_layer: torch.Tensor, ready: Event) -> None:
        """One block-copy kernel for every live transfer of ``step`` (see the module)."""
        assert isinstance(step, _StepCopy)
        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
                if ready is not None and self._stream is not None:
                    self._stream.wait_event(ready)
                if step.tensors is None:
                    step.tensors = (index_tensor(step.src, self._device), index_tensor(step.dst, self._device))
                copy_blocks(kv_cache_layer, self._remote[layer], *step.tensors)
                written = record_event(self._device)
        except Exception as e:  # noqa: BLE001 - a failed launch breaks the channel
            self._channel_failed(f"writing KV into {self.peer} failed: {type(e).__name__}: {e}")
            return
        for entry in step.entries:
            self._last_write[entry.record.handle.transfer_id] = written

    def cancel(self, handle: Any) -> None:
        """Cancel, then wait (bounded) until the transfer's launched copies completed."""
        with self._lock:
            super().cancel(handle)
            fence = self._last_write.pop(handle.transfer_id, None)
        self._fence(fence)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            cancelled = self._mark_closed()
            fences = list(self._last_write.values())
            self._last_write.clear()
        for fence in fences:
            self._fence(fence)
        for tid in cancelled:
            self._notices.put((OutgoingMessage(Header(MessageKind.CANCEL, tid)), None))
        self._notices.put((OutgoingMessage(Header(MessageKind.CLOSE)), None))
        self._notices.put(_STOP)
        self._thread.join(self._close_timeout_s)
        self._remote = []  # unmaps the peer's caches once the last copy referencing them is gone

    def _channel_failed(self, error: str) -> None:
        super()._channel_failed(error)
        self._last_write.clear()

    # -- the notifier thread ---------------------------------------------------------------------------

    def _fence(self, event: Event) -> None:
        if event is not None and not wait_event(event, time.monotonic() + self._op_timeout_s):
            logger.error("KV writes into %s did not complete within %g s", self.peer, self._op_timeout_s)

    def _notify(self) -> None:
        while True:
            item = self._notices.get()
            if item is _STOP:
                return
            message, fence = item
            try:
                if message.header.kind is MessageKind.FINISH:
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


def open_ipc_sender(bootstrap: Mapping[str, Any], caches: Sequence[torch.Tensor], layout: KVLayoutInfo,
                    **options: Any) -> IpcSender:
    """Map the receiver's caches and join it as a ``cuda_ipc`` sender (options as for ``open_sender``).

    Raises :class:`IpcUnavailable` when the caches cannot be mapped here (the caller may fall back to
    NCCL), :class:`HandshakeError` when the receiver refuses or cannot be reached."""
    return IpcSender(bootstrap, caches, layout, **options)


__all__ = ["IpcSender", "IpcUnavailable", "open_ipc_sender"]

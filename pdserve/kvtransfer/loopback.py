"""The in-process reference transport: a sender and a receiver joined by direct tensor copies.

It runs the same header semantics as the real transports (the receiver side is the shared
:class:`ReceiverCore`, fed the same :class:`Header` objects), but every message is delivered
synchronously inside the sender call, on the caller's current stream: ``send_layer`` gathers the blocks,
copies them to the receiver's device and scatters them before returning. That makes it the simplest
correct implementation of the contract, the one the others are tested against, and a way to run
both roles in one process (tests, colocated experiments). It is not meant to overlap with compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.kvtransfer.base import HandshakeError, KVLayoutInfo
from pdserve.kvtransfer.messages import Header, MessageKind, gather_blocks
from pdserve.kvtransfer.receiving import ReceiverCore
from pdserve.kvtransfer.sending import OutgoingMessage, SenderCore
from pdserve.kvtransfer.streams import index_tensor


class LoopbackReceiver(ReceiverCore):
    """A receiver whose messages come straight from a :class:`LoopbackSender` in this process."""

    def close(self) -> None:
        self._close_records("the receiver was closed")
        self._join_completions(5.0)


class LoopbackSender(SenderCore):
    """A sender that delivers each message into its :class:`LoopbackReceiver` before returning."""

    def __init__(self, caches: Sequence[torch.Tensor], layout: KVLayoutInfo, receiver: LoopbackReceiver,
                 name: str = "loopback") -> None:
        super().__init__(caches, layout, peer="loopback-receiver")
        self._receiver = receiver
        self._name = name
        self._receiver_device = receiver._device

    def _submit(self, message: OutgoingMessage) -> None:
        header = message.header
        if header.kind is MessageKind.LAYER:
            if not self._is_live(header.transfer_id):
                return
            assert message.kv_layer is not None
            payload = gather_blocks(message.kv_layer, index_tensor(message.src_block_ids, self._device))
            self._receiver.deliver_layer(self._name, header, payload.to(self._receiver_device))
        elif header.kind is MessageKind.FINISH:
            if not self._is_live(header.transfer_id):
                return
            self._mark_pushing(message)
            self._receiver.deliver_finish(self._name, header)
        elif header.kind is MessageKind.CANCEL:
            self._receiver.deliver_cancel(self._name, header)
        self._message_done(message)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            for transfer_id in self._mark_closed():
                self._receiver.deliver_cancel(self._name, Header(MessageKind.CANCEL, transfer_id))
            self._receiver.peer_lost(self._name, f"the sender {self._name} closed the channel")


class LoopbackChannel:
    """A connected in-process sender/receiver pair (``channel.sender``, ``channel.receiver``).

    ``receiver_layout`` defaults to the receiver caches' own layout under the sender's model name; a
    layout that differs from the sender's raises :class:`HandshakeError` naming the field, as the
    process-group transport's handshake does.
    """

    def __init__(self, sender_caches: Sequence[torch.Tensor], sender_layout: KVLayoutInfo,
                 receiver_caches: Sequence[torch.Tensor], receiver_layout: KVLayoutInfo | None = None) -> None:
        if receiver_layout is None:
            receiver_layout = KVLayoutInfo.from_caches(
                receiver_caches, sender_layout.model, tensor_parallel_size=sender_layout.tensor_parallel_size)
        problem = sender_layout.mismatch(receiver_layout)
        if problem is not None:
            raise HandshakeError(f"KV layouts differ: {problem}", sender_layout.mismatch_field(receiver_layout))
        self.receiver = LoopbackReceiver(receiver_caches, receiver_layout)
        self.sender = LoopbackSender(sender_caches, sender_layout, self.receiver)

    def close(self) -> None:
        """Close the sender, then the receiver."""
        self.sender.close()
        self.receiver.close()

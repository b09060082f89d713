"""KV cache transfer from prefill to decode workers: interfaces and transports.

Public API:

* :class:`KVLayoutInfo`, :class:`TransferState`, :class:`TransferHandle`, :class:`HandshakeError`,
  :class:`KVSender`, :class:`KVReceiver` (``base``): the contract every transport implements;
* :class:`LoopbackChannel` (``loopback``): the in-process reference transport;
* :func:`open_receiver` / :func:`open_sender` (``process_group``): gloo/NCCL between processes, and
  CUDA IPC writes into a same-host receiver's caches;
* :func:`resolve_backend` (``factory``): "auto" -> "cuda_ipc" on CUDA (NCCL across hosts), "gloo" on CPU.

This package imports torch and ``pdserve.common`` only (never Ray, gRPC or a role package).
"""

from __future__ import annotations

from pdserve.kvtransfer.base import (
    LAYOUT_NAME,
    HandshakeError,
    KVLayoutInfo,
    KVReceiver,
    KVSender,
    LayerSend,
    TransferHandle,
    TransferState,
)
from pdserve.kvtransfer.factory import BACKENDS, resolve_backend
from pdserve.kvtransfer.loopback import LoopbackChannel, LoopbackReceiver, LoopbackSender
from pdserve.kvtransfer.messages import Header, MessageKind
from pdserve.kvtransfer.process_group import (
    DEFAULT_GROUP_NAME,
    ProcessGroupReceiver,
    ProcessGroupSender,
    open_receiver,
    open_sender,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_GROUP_NAME",
    "LAYOUT_NAME",
    "LayerSend",
    "HandshakeError",
    "Header",
    "KVLayoutInfo",
    "KVReceiver",
    "KVSender",
    "LoopbackChannel",
    "LoopbackReceiver",
    "LoopbackSender",
    "MessageKind",
    "ProcessGroupReceiver",
    "ProcessGroupSender",
    "TransferHandle",
    "TransferState",
    "open_receiver",
    "open_sender",
    "resolve_backend",
]

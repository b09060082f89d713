"""KV transfer between processes: NCCL or gloo over a two-rank process group, or CUDA IPC writes.

The decode worker calls :func:`open_receiver` and hands the returned bootstrap dict to its prefill
workers, which call :func:`open_sender`; each (receiver, sender) pair gets its own channel, built when
that sender joins, without any default process group. Headers go through the receiver's ``TCPStore``
(one queue per pair). Payloads go through the pair's group (``send``/``recv`` of raw bytes), or, with
the ``cuda_ipc`` backend and a sender on the same host, straight into the receiver's mapped caches.
The pieces: :mod:`~pdserve.kvtransfer.rendezvous` (store, handshake, group creation),
:mod:`~pdserve.kvtransfer.pg_sender`, :mod:`~pdserve.kvtransfer.ipc_sender`,
:mod:`~pdserve.kvtransfer.pg_receiver`; the message format is in :mod:`~pdserve.kvtransfer.messages`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pdserve.kvtransfer.base import KVLayoutInfo, KVSender
from pdserve.kvtransfer.cuda_ipc import IpcUnavailable
from pdserve.kvtransfer.pg_receiver import DEFAULT_GROUP_NAME, ProcessGroupReceiver, open_receiver
from pdserve.kvtransfer.pg_sender import ProcessGroupSender

logger = logging.getLogger(__name__)


def open_sender(bootstrap: Mapping[str, Any], caches: Sequence[torch.Tensor], layout: KVLayoutInfo,
                **options: Any) -> KVSender:
    """Connect to the receiver described by ``bootstrap`` (from :func:`open_receiver`).

    A ``cuda_ipc`` receiver is written to directly when its caches can be mapped here, else (another
    host) over NCCL. ``options``: ``name`` (how the receiver calls this sender), ``join_timeout_s``,
    ``op_timeout_s``, ``close_timeout_s``, ``max_inflight_bytes``. Raises :class:`HandshakeError` when
    the layouts or backends differ, or the receiver cannot be reached or does not join in time.
    """
    if bootstrap.get("backend") == "cuda_ipc":
        from pdserve.kvtransfer.ipc_sender import open_ipc_sender  # its kernel needs triton (CUDA hosts)

        try:
            return open_ipc_sender(bootstrap, caches, layout, **options)
        except IpcUnavailable as e:
            logger.info("KV transfer to %s:%s: %s; using NCCL", bootstrap.get("host"), bootstrap.get("port"), e)
    return ProcessGroupSender(bootstrap, caches, layout, **options)


__all__ = ["DEFAULT_GROUP_NAME", "ProcessGroupReceiver", "ProcessGroupSender", "open_receiver",
           "open_sender"]

"""KV transfer over a two-rank ``torch.distributed`` process group: gloo for CPU caches, NCCL for CUDA.

The decode worker calls :func:`open_receiver` and hands the returned bootstrap dict to its prefill
workers, which call :func:`open_sender`; each (receiver, sender) pair gets its own two-rank group, built
when that sender joins, without any default process group. Headers go through the receiver's
``TCPStore`` (one queue per pair), payloads through the group (``send``/``recv`` of raw bytes), both in
FIFO order. The pieces: :mod:`~pdserve.kvtransfer.rendezvous` (store, handshake, group creation),
:mod:`~pdserve.kvtransfer.pg_sender`, :mod:`~pdserve.kvtransfer.pg_receiver`;
the message format is in :mod:`~pdserve.kvtransfer.messages`.
"""

from __future__ import annotations

from pdserve.kvtransfer.pg_receiver import DEFAULT_GROUP_NAME, ProcessGroupReceiver, open_receiver
from pdserve.kvtransfer.pg_sender import ProcessGroupSender, open_sender

__all__ = ["DEFAULT_GROUP_NAME", "ProcessGroupReceiver", "ProcessGroupSender", "open_receiver", "open_sender"]

"""What goes through a KV receiver's ``TCPStore`` is sealed with the cluster token.

torch's ``TCPStore`` has no authentication: anyone who reaches its port can read and write every key.
The store carries the receiver's description (layout, backend, CUDA IPC handles), the senders' join
requests, the receiver's verdicts and every header (PLAN, FINISH, CANCEL, CLOSE). Forged, those would
let a stranger join as a sender, announce bytes into the blocks of a live transfer, or finish one with
a token of its choosing. So when the worker has the cluster token (``PDSERVE_CLUSTER_TOKEN``, minted by
the launcher and given to every worker), each such value carries an HMAC-SHA256 tag keyed by it and
bound to its place (``context``: the receiver, a join, a pair's channel); a pair's headers are also
numbered, so none can be replayed or reordered. A value that does not open is refused: a join is
answered with nothing, a header is dropped and logged. Both sides must hold the same token; a
worker with a token refuses an unsealed peer and one without a token a sealed peer, with an error that
says so.

Not covered: the bulk bytes travel over the pair's gloo or NCCL group, whose own rendezvous (under
the pair's ``/pg`` prefix of the same store) torch does not authenticate. Keep KV traffic on a private
network; this closes the control path, not the data path.

Wire form of a sealed value: ``MAGIC`` + 8-byte number (a counter, or a random nonce for one-shot
values) + 32-byte tag + payload.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from typing import Any

from pdserve.kvtransfer.messages import ProtocolError
from pdserve.rpc.auth import CLUSTER_TOKEN_ENV

MAGIC = b"PDKV1"
_NUMBER, _TAG = 8, 32
_HEAD = len(MAGIC) + _NUMBER + _TAG


def cluster_key() -> bytes | None:
    """This process's cluster token as an HMAC key (None: no token, values go unsealed)."""
    token = os.environ.get(CLUSTER_TOKEN_ENV)
    return token.encode() if token else None


def _tag(key: bytes, context: str, number: bytes, payload: bytes) -> bytes:
    return hmac.new(key, context.encode() + b"\0" + number + payload, hashlib.sha256).digest()


def _seal(key: bytes | None, context: str, number: bytes, payload: bytes) -> bytes:
    return payload if key is None else MAGIC + number + _tag(key, context, number, payload) + payload


def _open(key: bytes | None, context: str, data: bytes) -> tuple[int, bytes]:
    """``(number, payload)`` of a sealed value (number -1 when unsealed); ProtocolError if it does not open."""
    sealed = data.startswith(MAGIC)
    if key is None:
        if sealed:
            raise ProtocolError(f"{context}: the peer seals with a cluster token and this worker has none "
                                f"(set {CLUSTER_TOKEN_ENV} alike on every worker)")
        return -1, data
    if not sealed or len(data) < _HEAD:
        raise ProtocolError(f"{context}: an unsealed value where this worker's cluster token requires a sealed "
                            f"one (a stranger, or a peer without {CLUSTER_TOKEN_ENV})")
    number = data[len(MAGIC):len(MAGIC) + _NUMBER]
    payload = data[_HEAD:]
    if not hmac.compare_digest(data[len(MAGIC) + _NUMBER:_HEAD], _tag(key, context, number, payload)):
        raise ProtocolError(f"{context}: a value whose seal does not match this cluster's token")
    return int.from_bytes(number, "big"), payload


def seal_once(key: bytes | None, context: str, payload: bytes) -> bytes:
    """A one-shot value (a description, a join, a verdict), bound to ``context``."""
    return _seal(key, context, secrets.token_bytes(_NUMBER), payload)


def open_once(key: bytes | None, context: str, data: bytes) -> bytes:
    return _open(key, context, data)[1]


class SealedQueue:
    """The sending end of a pair's header queue: numbers and seals each value, then pushes it (one
    lock around both, so the numbers reach the queue in order whatever thread sends)."""

    def __init__(self, store: Any, queue: str, key: bytes | None, context: str) -> None:
        self._store, self._queue, self._key, self._context = store, queue, key, context
        self._next = 1
        self._lock = threading.Lock()

    def push(self, payload: bytes) -> None:
        with self._lock:
            number, self._next = self._next, self._next + 1
            self._store.queue_push(self._queue, _seal(self._key, self._context, number.to_bytes(_NUMBER, "big"),
                                                      payload))


class QueueOpener:
    """The receiving end: opens each value, refusing any whose number is not above the last one's."""

    def __init__(self, key: bytes | None, context: str) -> None:
        self._key, self._context = key, context
        self._last = 0

    def open(self, data: bytes) -> bytes:
        number, payload = _open(self._key, self._context, data)
        if self._key is not None:
            if number <= self._last:
                raise ProtocolError(f"{self._context}: a replayed or reordered header (number {number} after "
                                    f"{self._last})")
            self._last = number
        return payload

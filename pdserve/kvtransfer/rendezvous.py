"""Rendezvous for the process-group transport: the store, the handshake keys, the two-rank groups.

The receiver (decode side) hosts a ``torch.distributed.TCPStore`` (``is_master=True``). Under the prefix
``group_name`` it publishes its layout and backend (``RECEIVER_KEY``). A sender joins in four steps:

1. read ``RECEIVER_KEY``, compare layouts and backend (``HandshakeError`` on a mismatch);
2. take a pair index ``k = add(PEER_COUNTER, 1) - 1`` and push its own layout to ``JOIN_QUEUE``;
3. wait for ``verdict_key(k)``: ``"ok"`` or the receiver's reason to refuse;
4. both sides build a two-rank process group on ``PrefixStore(group_name/pair{k}/pg, store)``: the
   sender is rank 0, the receiver rank 1. No default (global) process group is involved, so a worker
   can hold any number of these next to whatever else it runs.

With a cluster token (``PDSERVE_CLUSTER_TOKEN``) every value of steps 1-3 and every header of a pair's
queue is sealed (:mod:`pdserve.kvtransfer.sealing`): a stranger on the store's port cannot join or
forge a header. Each side gives the process group its own store connection: a blocking queue pop on one connection
would otherwise stall the group's store traffic (NCCL exchanges its unique id through the store).
Group constructors differ little between torch versions; :func:`create_pair_group` only uses the
forms torch 2.4 .. 2.13 share (``ProcessGroupGloo(store, rank, size, timeout)`` and
``ProcessGroupNCCL(store, rank, size, options)`` with ``options._timeout``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Collection
from typing import Any

import torch.distributed as dist

from pdserve.kvtransfer.base import HandshakeError, KVLayoutInfo
from pdserve.kvtransfer.messages import PROTOCOL_VERSION, ProtocolError
from pdserve.kvtransfer.sealing import open_once, seal_once

RECEIVER_KEY = "receiver"
JOIN_QUEUE = "joins"
PEER_COUNTER = "peers/next"
MESSAGE_QUEUE = "messages"
SENDER_RANK = 0
RECEIVER_RANK = 1
#: Blocking store pops wake up at least this often (a timed-out pop just starts again); shutdown
#: never waits on it: the closing side pushes a STOP message instead.
IDLE_POP_TIMEOUT = datetime.timedelta(hours=1)

Store = Any  # torch.distributed.Store; its stubs are incomplete across versions
Group = Any  # torch.distributed.ProcessGroupGloo | ProcessGroupNCCL (a c10d Backend)


def receiver_context(group_name: str) -> str:
    """Where a receiver's sealed description belongs (:mod:`pdserve.kvtransfer.sealing`)."""
    return f"{group_name}/receiver"


def join_context(group_name: str) -> str:
    return f"{group_name}/join"


def verdict_context(group_name: str, index: int) -> str:
    return f"{group_name}/verdict/{index}"


def channel_context(group_name: str, index: int) -> str:
    """Where the headers of pair ``index`` belong."""
    return f"{group_name}/pair/{index}"


def verdict_key(index: int) -> str:
    return f"peers/{index}/verdict"


def pair_prefix(group_name: str, index: int) -> str:
    """The store prefix of pair ``index``; its message queue and process group live under it."""
    return f"{group_name}/pair{index}"


def host_store(host: str, port: int, timeout: datetime.timedelta) -> Store:
    """The receiver's store server on ``host:port`` (port 0: a free port, see ``store.port``)."""
    store = dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False)
    if not hasattr(store, "queue_push"):
        raise RuntimeError("the KV transfer needs torch.distributed store queues (torch >= 2.8)")
    return store


def connect_store(host: str, port: int, timeout: datetime.timedelta) -> Store:
    """A client connection to the store at ``host:port``; ``DistNetworkError`` if unreachable in time."""
    return dist.TCPStore(host, port, None, False, timeout)


def is_store_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a store wait that timed out (the connection itself is still fine)."""
    network_error = getattr(dist, "DistNetworkError", None)
    if network_error is not None and isinstance(error, network_error):
        return False
    store_error = getattr(dist, "DistStoreError", None)
    if store_error is not None:
        return isinstance(error, store_error) and "timeout" in str(error).lower()
    return isinstance(error, RuntimeError) and "timeout" in str(error).lower()


def receiver_info(layout: KVLayoutInfo, backend: str, ipc: dict[str, Any] | None = None) -> str:
    """What the receiver publishes under ``RECEIVER_KEY`` (JSON); ``ipc``: its exported caches."""
    info: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "backend": backend, "layout": layout.to_dict()}
    if ipc is not None:
        info["ipc"] = ipc
    return json.dumps(info)


def join_request(index: int, name: str, layout: KVLayoutInfo, backend: str) -> str:
    """What a sender pushes to ``JOIN_QUEUE`` (JSON)."""
    return json.dumps({"index": index, "name": name, "backend": backend,
                       "protocol": PROTOCOL_VERSION, "layout": layout.to_dict()})


def check_peer(mine: KVLayoutInfo, my_backend: str | Collection[str], info: dict[str, Any]) -> None:
    """Raise :class:`HandshakeError` unless the peer described by ``info`` can exchange KV with us
    (same protocol and layout, and a backend in ``my_backend``: one name or several accepted)."""
    accepted = {my_backend} if isinstance(my_backend, str) else set(my_backend)
    if info.get("protocol") != PROTOCOL_VERSION:
        raise HandshakeError(f"protocol: this worker speaks KV transfer protocol {PROTOCOL_VERSION}, "
                             f"the peer {info.get('protocol')!r}", "protocol")
    try:
        theirs = KVLayoutInfo.from_dict(info["layout"])
    except (KeyError, TypeError, ValueError) as e:
        raise HandshakeError(f"the peer sent an unreadable KV layout: {e}") from None
    problem = mine.mismatch(theirs)
    if problem is not None:
        raise HandshakeError(f"KV layouts differ: {problem}", mine.mismatch_field(theirs))
    if info.get("backend") not in accepted:
        raise HandshakeError(f"backend: this worker uses {' or '.join(sorted(map(repr, accepted)))}, the peer "
                             f"{info.get('backend')!r}", "backend")


def read_receiver(host: str, port: int, group_name: str, join: datetime.timedelta,
                  key: bytes | None = None) -> tuple[Store, Store, dict[str, Any]]:
    """Connect to a receiver's store: ``(connection, PrefixStore(group_name), receiver info)``, or
    :class:`HandshakeError` when it cannot be reached, publishes nothing within ``join``, or its
    description does not open with ``key`` (the cluster token, :mod:`pdserve.kvtransfer.sealing`)."""
    try:
        store = connect_store(host, port, join)
    except Exception as e:  # noqa: BLE001 - any connect failure is a handshake failure
        raise HandshakeError(f"cannot reach the KV receiver's store at {host}:{port} within "
                             f"{join.total_seconds():g} s: {e}") from None
    root = dist.PrefixStore(group_name, store)
    try:
        root.wait([RECEIVER_KEY], join)
        raw = bytes(root.get(RECEIVER_KEY))
    except Exception as e:  # noqa: BLE001
        raise HandshakeError(f"no KV receiver {group_name!r} at {host}:{port}: {e}") from None
    try:
        info = json.loads(open_once(key, receiver_context(group_name), raw))
    except ProtocolError as e:
        raise HandshakeError(f"the KV receiver at {host}:{port}: {e}", "cluster_token") from None
    return store, root, info


def join_receiver(root: Store, name: str, layout: KVLayoutInfo, backend: str, join: datetime.timedelta,
                  where: str, *, group_name: str, key: bytes | None = None) -> int:
    """Join as a sender speaking ``backend``: take a pair index, ask, and wait for the verdict (sealed
    with ``key`` both ways). Returns the pair index; :class:`HandshakeError` if refused or unanswered
    within ``join``."""
    index = root.add(PEER_COUNTER, 1) - 1
    root.queue_push(JOIN_QUEUE, seal_once(key, join_context(group_name), join_request(index, name, layout,
                                                                                     backend).encode()))
    try:
        root.wait([verdict_key(index)], join)
    except Exception:  # noqa: BLE001
        raise HandshakeError(f"the KV receiver at {where} did not answer the handshake within "
                             f"{join.total_seconds():g} s (a receiver with another cluster token drops the "
                             f"request unanswered)") from None
    try:
        verdict = open_once(key, verdict_context(group_name, index), bytes(root.get(verdict_key(index)))).decode()
    except ProtocolError as e:
        raise HandshakeError(f"the KV receiver at {where}: {e}", "cluster_token") from None
    if verdict != "ok":
        raise HandshakeError(f"the KV receiver refused this sender: {verdict}")
    return int(index)


def create_pair_group(backend: str, store: Store, rank: int, timeout: datetime.timedelta,
                      name: str) -> Group:
    """A two-rank gloo or NCCL process group on ``store`` (which should be a ``PrefixStore``).

    Gloo connects in the constructor and so blocks until both ranks joined (at most ``timeout``);
    NCCL creates its communicator at the first send/recv (the HELLO message).
    """
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL")
        options = dist.ProcessGroupNCCL.Options()
        for attr, value in (("is_high_priority_stream", False), ("_timeout", timeout), ("group_name", name)):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(options, attr, value)
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    raise ValueError(f"no process group for backend {backend!r}")


def shutdown_group(group: Group, abort: bool = False) -> None:
    """Release a group's communicators if this torch supports it; never raises."""
    for method in (("abort", "shutdown") if abort else ("shutdown", "abort")):
        fn = getattr(group, method, None)
        if fn is None:
            continue
        try:
            fn()
            return
        except Exception:  # noqa: BLE001 - best effort: older backends raise "not implemented"
            continue

"""The decode side of the process-group transport: a store server, an accept thread, one thread per sender.

Lifecycle: :func:`open_receiver` starts the ``TCPStore`` server, publishes this side's layout and backend,
starts the accept thread and returns ``(receiver, bootstrap)``; ``bootstrap`` (host, port, group_name,
backend, protocol: plain JSON-able values) goes to prefill workers, which call ``open_sender`` with it.
The accept thread checks each joining sender (:func:`check_peer`), answers with a verdict and starts a
channel thread for it, which builds the pair's two-rank group (lazily, when that sender joins) and then
loops: pop the next header from the pair's store queue; a PLAN goes to the channel's
:class:`~pdserve.kvtransfer.landing.PlanLanding`, which posts every receive it announces at once and lands
the bytes (in place, or staged and scattered); FINISH/CANCEL go to :class:`ReceiverCore`. CLOSE from the
sender ends the channel and fails the unfinished transfers that heard from it; a broken group does the
same with the error. A channel that ends while receives it posted still wait aborts its group.

A ``cuda_ipc`` receiver also exports its caches (CUDA IPC handles, in the published receiver info).
A sender on the same host maps them and writes the blocks itself (:mod:`pdserve.kvtransfer.cuda_ipc`);
its channel has no process group and carries only FINISH (sent once every write completed) and CANCEL.
Senders that cannot map the caches join as NCCL senders instead, on the same receiver.

Why headers travel through the store and not the process group: the reader must wait for the next
message for as long as a worker idles. A receive posted on a gloo group cannot be interrupted (abort
does not wake it; its timeout breaks the group) and an idle NCCL receive trips the watchdog. A blocking
store-queue pop has neither problem, and ``close()`` wakes it by pushing a STOP message itself. Bulk
receives are posted only once their PLAN arrived, that is once the sender is already sending them; one
PLAN announces a run of messages, so the store is visited once per run, not per message.

``close()`` refuses further writes and cancels unfinished transfers at once, then stops the threads
(at most ``close_timeout_s``) and the store server. Senders notice through their next send failing.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pdserve.kvtransfer.base import HandshakeError, KVLayoutInfo
from pdserve.kvtransfer.cuda_ipc import export_caches
from pdserve.kvtransfer.factory import process_group_backend, resolve_backend
from pdserve.kvtransfer.landing import PlanLanding
from pdserve.kvtransfer.messages import PROTOCOL_VERSION, Header, MessageKind, ProtocolError, as_bytes
from pdserve.kvtransfer.plan import decode_plan
from pdserve.kvtransfer.receiving import ReceiverCore
from pdserve.kvtransfer.rendezvous import (
    IDLE_POP_TIMEOUT,
    JOIN_QUEUE,
    MESSAGE_QUEUE,
    RECEIVER_KEY,
    RECEIVER_RANK,
    SENDER_RANK,
    Group,
    channel_context,
    check_peer,
    connect_store,
    create_pair_group,
    host_store,
    is_store_timeout,
    join_context,
    pair_prefix,
    receiver_context,
    receiver_info,
    shutdown_group,
    verdict_context,
    verdict_key,
)
from pdserve.kvtransfer.sealing import QueueOpener, cluster_key, open_once, seal_once
from pdserve.kvtransfer.streams import is_cuda, spread_problem

logger = logging.getLogger(__name__)
DEFAULT_GROUP_NAME = "pdserve-kv"
#: What ``close()`` pushes to wake its own threads (unsealed: they stop on it only while closing).
_STOP = json.dumps({"stop": True}).encode()
_STOP_HEADER = Header(MessageKind.STOP).pack()


@dataclass(eq=False)
class _Channel:
    index: int
    name: str
    one_sided: bool = False  # a cuda_ipc sender: it writes the blocks itself, only FINISH/CANCEL come here
    thread: threading.Thread | None = None
    group: Group | None = None
    landing: PlanLanding | None = None


class ProcessGroupReceiver(ReceiverCore):
    """A :class:`KVReceiver` serving any number of senders; build it with :func:`open_receiver`."""

    def __init__(self, caches: Sequence[torch.Tensor], layout: KVLayoutInfo, *, host: str = "127.0.0.1",
                 port: int = 0, group_name: str = DEFAULT_GROUP_NAME, backend: str = "auto",
                 join_timeout_s: float = 60.0, op_timeout_s: float = 60.0, close_timeout_s: float = 5.0,
                 accept_one_sided: bool | None = None) -> None:
        super().__init__(caches, layout, fence_timeout_s=op_timeout_s)
        self._backend = resolve_backend(backend, self._device)
        if self._backend == "loopback":
            raise ValueError("the loopback backend is in-process: use LoopbackChannel")
        self._group_backend = process_group_backend(self._backend)
        problem = spread_problem(caches)  # a tensor-parallel worker's: scattered from layer 0's GPU
        if problem is not None:
            raise ValueError(problem)
        # cuda_ipc senders write into the exported caches; tests also admit them next to gloo
        self._accept_one_sided = self._backend == "cuda_ipc" if accept_one_sided is None else accept_one_sided
        ipc = None
        if self._backend == "cuda_ipc":
            try:
                ipc = export_caches(caches)
            except RuntimeError as e:  # e.g. an allocator mode without IPC support: senders use NCCL
                logger.warning("cannot export the KV caches over CUDA IPC (%s); senders will use NCCL", e)
        self._join = datetime.timedelta(seconds=join_timeout_s)
        self._op_timeout_s = op_timeout_s
        self._close_timeout_s = close_timeout_s
        self._group_name = group_name
        self._master: Any = host_store(host, port, self._join)
        self._host, self._port = host, int(self._master.port)
        root: Any = dist.PrefixStore(group_name, self._master)  # (torch's stub says str; bytes are stored)
        self._root = root
        self._key = cluster_key()  # every value through the store is sealed with it (sealing.py)
        root.set(RECEIVER_KEY, seal_once(self._key, receiver_context(group_name),
                                         receiver_info(layout, self._backend, ipc).encode()))
        self._channels: list[_Channel] = []
        self._admitted: set[int] = set()  # pair indices: a join is answered once
        self.num_dropped_values = 0  # joins and headers that did not open (a stranger's, or mis-keyed)
        self._closing = False
        self.rejected_peers: list[str] = []
        self._accept_thread = threading.Thread(target=self._accept, name="kv-receiver-accept", daemon=True)
        self._accept_thread.start()

    @property
    def bootstrap(self) -> dict[str, Any]:
        """What a sender needs to connect (JSON-able)."""
        return {"host": self._host, "port": self._port, "group_name": self._group_name,
                "backend": self._backend, "protocol": PROTOCOL_VERSION}

    @property
    def peer_transports(self) -> dict[str, str]:
        """How each joined sender sends: ``"cuda_ipc"`` (one-sided writes) or the group backend."""
        with self._cond:
            return {c.name: "cuda_ipc" if c.one_sided else self._group_backend for c in self._channels}

    @property
    def landed_messages(self) -> dict[str, int]:
        """Messages of the open channels received straight into the cache (``direct``) and through a
        staging buffer and a scatter (``staged``)."""
        with self._cond:
            landings = [c.landing for c in self._channels if c.landing is not None]
        return {"direct": sum(landing.num_direct for landing in landings),
                "staged": sum(landing.num_staged for landing in landings)}

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            channels = list(self._channels)
        self._close_records("the receiver was closed")
        try:
            self._root.queue_push(JOIN_QUEUE, _STOP)
            for channel in channels:
                pair = dist.PrefixStore(pair_prefix(self._group_name, channel.index), self._master)
                pair.queue_push(MESSAGE_QUEUE, _STOP_HEADER)
        except Exception:  # noqa: BLE001 - the threads are abandoned below if they cannot be woken
            pass
        end = time.monotonic() + self._close_timeout_s
        for thread in [self._accept_thread, *(c.thread for c in channels)]:
            if thread is not None and thread.ident is not None:
                thread.join(max(0.0, end - time.monotonic()))
        for channel in channels:
            if channel.thread is not None and channel.thread.is_alive() and channel.group is not None:
                shutdown_group(channel.group, abort=True)
        self._join_completions(max(0.1, end - time.monotonic()))
        self._root = None
        self._master = None  # stops the store server

    # -- threads ---------------------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            store = connect_store(self._host, self._port, self._join)
            store.set_timeout(IDLE_POP_TIMEOUT)
            root = dist.PrefixStore(self._group_name, store)
            while True:
                raw = _pop(root, JOIN_QUEUE, lambda: self._closing)
                if raw is None or (raw == _STOP and self._closing):
                    return
                try:
                    request = json.loads(open_once(self._key, join_context(self._group_name), raw))
                except (ProtocolError, ValueError) as e:  # not from a sender of this cluster: unanswered
                    self._drop(f"a join request: {e}")
                    continue
                self._admit(root, request)
        except Exception:  # noqa: BLE001 - only while closing: the server went away
            return

    def _drop(self, what: str) -> None:
        self.num_dropped_values += 1
        logger.warning("KV receiver %s dropped %s", self._group_name, what)

    def _admit(self, root: Any, request: dict[str, Any]) -> None:
        index, name = int(request["index"]), str(request.get("name", "?"))
        if index in self._admitted:  # a replayed join
            self._drop(f"a second join request for pair {index}")
            return
        self._admitted.add(index)

        def answer(verdict: bytes) -> None:
            root.set(verdict_key(index), seal_once(self._key, verdict_context(self._group_name, index), verdict))

        accepted = {self._group_backend} | ({"cuda_ipc"} if self._accept_one_sided else set())
        try:
            check_peer(self.layout, accepted, request)
        except HandshakeError as e:
            self.rejected_peers.append(f"{name}: {e}")
            answer(str(e).encode())
            return
        channel = _Channel(index, name, one_sided=request.get("backend") == "cuda_ipc")
        with self._cond:
            if self._closing:
                answer(b"the receiver is closing")
                return
            channel.thread = threading.Thread(target=self._serve, args=(channel,), daemon=True,
                                              name=f"kv-receiver-{index}")
            self._channels.append(channel)
        answer(b"ok")
        channel.thread.start()

    def _serve(self, channel: _Channel) -> None:
        cuda = is_cuda(self._device)
        stream = torch.cuda.Stream(self._device) if cuda else None
        prefix = pair_prefix(self._group_name, channel.index)
        try:
            if cuda:
                torch.cuda.set_device(self._device)
            store = connect_store(self._host, self._port, self._join)
            messages = dist.PrefixStore(prefix, store)
            if channel.one_sided:
                store.set_timeout(IDLE_POP_TIMEOUT)
                self._loop(channel, messages)
                return
            # gloo uses the store only in its constructor, before the first pop; NCCL also uses it later
            # (communicator set-up, watchdog), so it gets a connection no blocking pop holds
            group_connection = store if self._group_backend == "gloo" else connect_store(self._host, self._port,
                                                                                    self._join)
            group_store = dist.PrefixStore(prefix + "/pg", group_connection)
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                # posted receives may legitimately wait for the sender's forward pass: the group's own
                # timeout (NCCL's watchdog) stays well behind the fence timeout, which aborts first
                channel.group = create_pair_group(self._group_backend, group_store, RECEIVER_RANK,
                                                  datetime.timedelta(seconds=2 * self._op_timeout_s + 60),
                                                  f"{self._group_name}/{channel.name}")
                channel.landing = PlanLanding(self, channel.name, channel.group, self._caches,
                                              self._op_timeout_s)
                store.set_timeout(IDLE_POP_TIMEOUT)  # from now on it waits for headers, idle or not
                self._loop(channel, messages)
        except Exception as e:  # noqa: BLE001 - a broken channel fails its transfers, nothing else
            if not self._closing:
                self.peer_lost(channel.name, f"the KV channel from {channel.name} failed: "
                                             f"{type(e).__name__}: {e}")
        finally:
            # drop the last reference too: that closes gloo's sockets, so a sender still sending to
            # this channel fails at once instead of waiting for its timeout
            # (an abort when receives it posted are still waiting, which ends them, and for NCCL, whose
            # orderly shutdown may wait on the peer)
            group, channel.group = channel.group, None
            landing, channel.landing = channel.landing, None
            if group is not None:
                shutdown_group(group, abort=self._group_backend == "nccl" or (landing is not None and landing.pending()))
            del group, landing

    def _loop(self, channel: _Channel, messages: Any) -> None:
        opener = QueueOpener(self._key, channel_context(self._group_name, channel.index))
        while True:
            raw = _pop(messages, MESSAGE_QUEUE, lambda: self._closing)
            if raw is None or (raw == _STOP_HEADER and self._closing):
                return
            try:
                header = Header.unpack(opener.open(raw))
            except ProtocolError as e:  # not from this channel's sender: dropped, the channel goes on
                self._drop(f"a header on the channel from {channel.name}: {e}")
                continue
            kind = header.kind
            if kind is MessageKind.STOP:
                return
            if kind is MessageKind.CLOSE:
                self.peer_lost(channel.name, f"the sender {channel.name} closed the channel")
                return
            if channel.one_sided and kind not in (MessageKind.FINISH, MessageKind.CANCEL):
                raise ProtocolError(f"a cuda_ipc sender sent a {kind.name} message")
            if kind is MessageKind.LAYER:
                raise ProtocolError("a LAYER message outside a PLAN (a sender of an older protocol?)")
            if kind is MessageKind.HELLO:
                self._receive(channel, header)
            elif kind is MessageKind.PLAN:
                assert channel.landing is not None
                channel.landing.land(decode_plan(header))
            elif kind is MessageKind.FINISH:
                self.deliver_finish(channel.name, header, written_by_sender=channel.one_sided)
            elif kind is MessageKind.CANCEL:
                self.deliver_cancel(channel.name, header)

    def _receive(self, channel: _Channel, header: Header) -> None:
        """Receive and drop exactly ``header.payload_nbytes`` bytes (HELLO: it warms the group up)."""
        if header.payload_nbytes == 0:
            return
        assert channel.group is not None
        buffer = torch.empty(header.payload_nbytes, dtype=torch.uint8, device=self._device)
        work = channel.group.recv([as_bytes(buffer)], SENDER_RANK, 0)
        if is_cuda(self._device):
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=self._op_timeout_s))

    def _abandon_writes(self, peer: str) -> None:
        """Abort the group of ``peer``'s channel: its posted receives end (the channel then fails)."""
        with self._cond:
            channels = [c for c in self._channels if c.name == peer and c.group is not None]
        for channel in channels:
            logger.warning("aborting the KV channel from %s: its announced messages did not arrive", peer)
            shutdown_group(channel.group, abort=True)


def _pop(store: Any, key: str, closing: Any) -> bytes | None:
    """The next value of queue ``key``; ``None`` once ``closing()`` (idle timeouts just retry)."""
    while True:
        try:
            return bytes(store.queue_pop(key))
        except Exception as e:
            if closing():
                return None
            if not is_store_timeout(e):
                raise


def open_receiver(host: str = "127.0.0.1", port: int = 0, group_name: str = DEFAULT_GROUP_NAME, *,
                  caches: Sequence[torch.Tensor], layout: KVLayoutInfo,
                  **options: Any) -> tuple[ProcessGroupReceiver, dict[str, Any]]:
    """Start a receiver on ``host:port`` (port 0: any free port) into ``caches``.

    Returns the receiver and its bootstrap info (``host``, ``port``, ``group_name``, ``backend``,
    ``protocol``) for :func:`open_sender`. ``options``: ``backend`` ("auto", "cuda_ipc", "nccl",
    "gloo"), ``join_timeout_s``, ``op_timeout_s``, ``close_timeout_s``, ``accept_one_sided`` (admit
    cuda_ipc senders; default: when the backend is cuda_ipc, which also exports the caches). ``host`` must be an address the senders
    can reach (the store server binds to all interfaces).
    """
    receiver = ProcessGroupReceiver(caches, layout, host=host, port=port, group_name=group_name, **options)
    return receiver, receiver.bootstrap

"""Test harness: a transport under test yields connected (receiver, sender driver) pairs.

The receiver always lives in the calling (test) process, with destination caches filled with
:data:`SENTINEL`. The sender lives where the transport puts it: in-process for loopback, in one spawned
child process for gloo/NCCL (:class:`SenderHost`, started once per transport and reused for every
pair). Tests drive senders through :class:`SenderDriver`, by transfer id, so the same scenario code runs
against any of them, and read the sender's source blocks back with ``source_blocks`` to compare.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kvtransfer.base import KVLayoutInfo, KVReceiver
from pdserve.kvtransfer.loopback import LoopbackChannel, LoopbackReceiver, LoopbackSender
from pdserve.kvtransfer.testing.drivers import LocalDriver, RemoteDriver, SenderDriver, SenderHost
from pdserve.kvtransfer.testing.spec import SENTINEL, CacheSpec, parse_devices, sentinel_caches

__all__ = ["SENTINEL", "CacheSpec", "LoopbackTransport", "Pair", "ProcessGroupTransport", "Transport"]


@dataclass
class Pair:
    """A connected receiver (in this process, over ``dst``) and a driver for its sender.

    ``owns_receiver`` is false for a pair made by :meth:`Transport.add_sender`: closing it closes
    the sender only.
    """

    receiver: KVReceiver
    dst: list[torch.Tensor]
    sender: SenderDriver
    owns_receiver: bool = True

    def close(self) -> None:
        self.sender.close()
        if self.owns_receiver:
            self.receiver.close()

    def reset(self) -> None:
        """Fill every destination block with the sentinel again."""
        for cache in self.dst:
            cache.fill_(SENTINEL)


class Transport(abc.ABC):
    """A transport under test: makes pairs; its source caches are random and shared by its pairs.

    Making a pair costs store connections (and, here, sometimes seconds of reverse DNS inside
    ``TCPStore``), so scenarios share one long-lived pair (:meth:`pair`) unless they need their own.
    """

    name: str
    spec: CacheSpec
    receiver_device: torch.device
    _shared: Pair | None = None

    @abc.abstractmethod
    def open_pair(self, receiver_layout: KVLayoutInfo | None = None) -> Pair:
        """A fresh pair; ``receiver_layout`` (default: the spec's layout) shapes the receiver's caches.
        Raises :class:`HandshakeError` as the sender would, with nothing left open."""

    @abc.abstractmethod
    def add_sender(self, pair: Pair) -> Pair:
        """A second sender into ``pair``'s receiver (the returned pair does not own the receiver)."""

    def pair(self) -> Pair:
        """The shared pair, opened on first use, with its destination reset to the sentinel."""
        if self._shared is None:
            self._shared = self.open_pair()
        self._shared.reset()
        return self._shared

    def discard_pair(self) -> None:
        """Close the shared pair (after a failed scenario), so the next :meth:`pair` is fresh."""
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()

    def close(self) -> None:
        """Release the shared pair and whatever else the transport holds."""
        self.discard_pair()


class LoopbackTransport(Transport):
    def __init__(self, spec: CacheSpec, device: str = "cpu", seed: int = 0) -> None:
        self.name, self.spec, self.receiver_device = "loopback", spec, torch.device(device)
        self._caches = spec.random_caches(device, torch.Generator().manual_seed(seed))

    def open_pair(self, receiver_layout: KVLayoutInfo | None = None) -> Pair:
        layout = receiver_layout or self.spec.layout()
        dst = sentinel_caches(layout, self.spec.num_dst_blocks, self.receiver_device, self.spec.receiver_head_split)
        channel = LoopbackChannel(self._caches, self.spec.layout(), dst, layout)
        return Pair(channel.receiver, dst, LocalDriver(channel.sender, self._caches))

    def add_sender(self, pair: Pair) -> Pair:
        assert isinstance(pair.receiver, LoopbackReceiver)
        sender = LoopbackSender(self._caches, self.spec.layout(), pair.receiver, name="loopback-2")
        return Pair(pair.receiver, pair.dst, LocalDriver(sender, self._caches), owns_receiver=False)


class ProcessGroupTransport(Transport):
    """Receivers here (on ``receiver_device``), senders in one child process (on ``sender_device``);
    either may name several devices, ``"cuda:0,cuda:1"``: a tensor-parallel worker's ranks."""

    def __init__(self, spec: CacheSpec, backend: str, receiver_device: str = "cpu",
                 sender_device: str = "cpu", seed: int = 0, **receiver_options: Any) -> None:
        self.name, self.spec, self.receiver_device = backend, spec, parse_devices(receiver_device)[0]
        self._receiver_devices = receiver_device
        self._backend = backend
        self._options = {"join_timeout_s": 30.0, "close_timeout_s": 5.0, **receiver_options}
        self._sender_device = sender_device
        self._host = SenderHost(spec, sender_device, seed)
        self._count = 0

    def open_pair(self, receiver_layout: KVLayoutInfo | None = None) -> Pair:
        from pdserve.kvtransfer.pg_receiver import open_receiver

        layout = receiver_layout or self.spec.layout()
        dst = sentinel_caches(layout, self.spec.num_dst_blocks, self._receiver_devices, self.spec.receiver_head_split)
        self._count += 1
        receiver, bootstrap = open_receiver("127.0.0.1", 0, f"contract-{self._count}", caches=dst,
                                            layout=layout, backend=self._backend, **self._options)
        try:
            driver = self._open_sender(bootstrap)
        except BaseException:
            receiver.close()
            raise
        return Pair(receiver, dst, driver)

    def add_sender(self, pair: Pair) -> Pair:
        from pdserve.kvtransfer.pg_receiver import ProcessGroupReceiver

        assert isinstance(pair.receiver, ProcessGroupReceiver)
        return Pair(pair.receiver, pair.dst, self._open_sender(pair.receiver.bootstrap), owns_receiver=False)

    def add_mortal_sender(self, pair: Pair) -> tuple[Pair, SenderHost]:
        """A second sender into ``pair``'s receiver in a process of its own, returned with that process's
        host so a scenario can kill it mid-transfer (a prefill worker that dies)."""
        from pdserve.kvtransfer.pg_receiver import ProcessGroupReceiver

        assert isinstance(pair.receiver, ProcessGroupReceiver)
        host = SenderHost(self.spec, self._sender_device, seed=1)
        try:
            driver = self._open_sender(pair.receiver.bootstrap, host)
        except BaseException:
            host.close()
            raise
        return Pair(pair.receiver, pair.dst, driver, owns_receiver=False), host

    def _open_sender(self, bootstrap: dict[str, Any], host: SenderHost | None = None) -> RemoteDriver:
        host = host or self._host
        self._count += 1
        key = f"sender-{self._count}"
        host.call("open", key, bootstrap, self.spec.layout().to_dict(), {"join_timeout_s": 30.0})
        return RemoteDriver(host, key)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._host.close()

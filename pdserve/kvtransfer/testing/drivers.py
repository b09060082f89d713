"""Sender drivers: one interface to drive a sender by transfer id, in this process or in a child.

:class:`SenderHost` spawns one child process (``spawn`` context: safe with CUDA and threads) that holds
random source caches and any number of process-group senders; :class:`RemoteDriver` forwards calls to
it over a pipe, one request and one answer at a time, and re-raises its errors (``HandshakeError`` and
``ValueError`` keep their type). A spawn costs seconds, so one host serves a whole test module.
"""

from __future__ import annotations

import abc
import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from pdserve.kvtransfer.base import (
    HandshakeError,
    KVLayoutInfo,
    KVSender,
    LayerSend,
    TransferHandle,
    TransferState,
)
from pdserve.kvtransfer.testing.spec import CacheSpec

_RPC_TIMEOUT_S = 60.0


class SenderDriver(abc.ABC):
    """One sender, driven by transfer id from the test process."""

    @abc.abstractmethod
    def begin(self, transfer_id: int, request_id: str, dst_block_ids: Sequence[int],
              num_skip_blocks: int = 0) -> None: ...

    @abc.abstractmethod
    def send_layers(self, transfer_id: int, layers: Sequence[int], src_block_ids: Sequence[int],
                    block_range: tuple[int, int]) -> None:
        """``send_layer`` for each of ``layers`` in order, with the sender's own cache layer."""

    @abc.abstractmethod
    def send_step(self, sends: Sequence[tuple[int, Sequence[int], tuple[int, int]]], layers: Sequence[int]) -> None:
        """One forward pass's sends, ``(transfer id, src_block_ids, block_range)`` each: ``prepare_step``
        once, then ``send_step_layer`` for each of ``layers`` in order."""

    @abc.abstractmethod
    def finish(self, transfer_id: int, payload: Sequence[int]) -> None: ...

    @abc.abstractmethod
    def cancel(self, transfer_id: int) -> None: ...

    @abc.abstractmethod
    def wait(self, transfer_id: int, timeout: float) -> TransferState: ...

    @abc.abstractmethod
    def source_blocks(self, layer: int, block_ids: Sequence[int]) -> torch.Tensor:
        """A CPU copy of blocks ``block_ids`` of the sender's layer ``layer``."""

    @abc.abstractmethod
    def rewrite_block(self, block_id: int, seed: int) -> None:
        """New random content in block ``block_id`` of every layer (a partial block filling up)."""

    @abc.abstractmethod
    def close(self) -> float:
        """Close the sender; returns how long ``close()`` took, in seconds."""


class _SenderState:
    """A sender, its source caches and its handles: the body of both driver kinds."""

    def __init__(self, sender: KVSender, caches: list[torch.Tensor]) -> None:
        self.sender, self.caches = sender, caches
        self.handles: dict[int, TransferHandle] = {}

    def run(self, op: str, *args: Any) -> Any:
        s, h = self.sender, self.handles
        if op == "begin":
            h[args[0]] = s.begin(*args)
        elif op == "send_layers":
            tid, layers, src, block_range = args
            for layer in layers:
                # a bad layer index still gets a real tensor: the sender itself must reject the index
                cache = self.caches[layer] if 0 <= layer < len(self.caches) else self.caches[0]
                s.send_layer(h[tid], layer, cache, list(src), tuple(block_range))
        elif op == "send_step":
            sends, layers = args
            step = s.prepare_step([LayerSend(h[tid], list(src), tuple(block_range)) for tid, src, block_range in sends])
            for layer in layers:
                s.send_step_layer(step, layer, self.caches[layer])
        elif op == "finish":
            s.finish(h[args[0]], args[1])
        elif op == "cancel":
            s.cancel(h[args[0]])
        elif op == "wait":
            return s.wait(h[args[0]], args[1]).value
        elif op == "close":
            start = time.monotonic()
            s.close()
            return time.monotonic() - start
        else:
            raise ValueError(f"unknown driver op {op!r}")
        return None


def _source_blocks(caches: list[torch.Tensor], layer: int, ids: Sequence[int]) -> torch.Tensor:
    return caches[layer][:, list(ids)].cpu()


def _rewrite_block(caches: list[torch.Tensor], block_id: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for cache in caches:
        cache[:, block_id] = torch.randn(cache[:, block_id].shape, generator=generator).to(cache.dtype)


class LocalDriver(SenderDriver):
    """A sender in this process."""

    def __init__(self, sender: KVSender, caches: list[torch.Tensor]) -> None:
        self._state = _SenderState(sender, caches)

    def begin(self, transfer_id: int, request_id: str, dst_block_ids: Sequence[int],
              num_skip_blocks: int = 0) -> None:
        self._state.run("begin", transfer_id, request_id, list(dst_block_ids), num_skip_blocks)

    def send_layers(self, transfer_id: int, layers: Sequence[int], src_block_ids: Sequence[int],
                    block_range: tuple[int, int]) -> None:
        self._state.run("send_layers", transfer_id, list(layers), list(src_block_ids), block_range)

    def send_step(self, sends: Sequence[tuple[int, Sequence[int], tuple[int, int]]], layers: Sequence[int]) -> None:
        self._state.run("send_step", [(t, list(src), tuple(r)) for t, src, r in sends], list(layers))

    def finish(self, transfer_id: int, payload: Sequence[int]) -> None:
        self._state.run("finish", transfer_id, list(payload))

    def cancel(self, transfer_id: int) -> None:
        self._state.run("cancel", transfer_id)

    def wait(self, transfer_id: int, timeout: float) -> TransferState:
        return TransferState(self._state.run("wait", transfer_id, timeout))

    def source_blocks(self, layer: int, block_ids: Sequence[int]) -> torch.Tensor:
        return _source_blocks(self._state.caches, layer, block_ids)

    def rewrite_block(self, block_id: int, seed: int) -> None:
        _rewrite_block(self._state.caches, block_id, seed)

    def close(self) -> float:
        return float(self._state.run("close"))


def _host_main(conn: Any, spec: dict[str, Any], device: str, seed: int) -> None:
    """The child process of :class:`SenderHost`: one request, one answer, until ``exit``."""
    from pdserve.kvtransfer.process_group import open_sender

    cache_spec = CacheSpec(**spec)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device.split(",")[0]))
    caches = cache_spec.random_caches(device, torch.Generator().manual_seed(seed))
    senders: dict[str, _SenderState] = {}
    while True:
        op, key, args = conn.recv()
        try:
            if op == "exit":
                for state in senders.values():
                    state.sender.close()
                conn.send(("ok", None))
                return
            if op == "open":
                bootstrap, layout, options = args
                sender = open_sender(bootstrap, caches, KVLayoutInfo.from_dict(layout), **options)
                senders[key] = _SenderState(sender, caches)
                result = None
            elif op == "source_blocks":
                result = _source_blocks(caches, *args)
            elif op == "rewrite_block":
                _rewrite_block(caches, *args)
                result = None
            else:
                result = senders[key].run(op, *args)
            conn.send(("ok", result))
        except Exception as e:  # noqa: BLE001 - every error goes back to the test process
            conn.send(("err", type(e).__name__, str(e), getattr(e, "field", None)))


class SenderHost:
    """A spawned child process hosting source caches and any number of process-group senders."""

    def __init__(self, spec: CacheSpec, device: str = "cpu", seed: int = 0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_host_main, args=(child, asdict(spec), device, seed), daemon=True)
        self._process.start()
        child.close()

    def call(self, op: str, key: str | None = None, *args: Any) -> Any:
        self._conn.send((op, key, args))
        if not self._conn.poll(_RPC_TIMEOUT_S):
            raise TimeoutError(f"the sender process did not answer {op!r} within {_RPC_TIMEOUT_S} s")
        reply = self._conn.recv()
        if reply[0] == "ok":
            return reply[1]
        name, message, field = reply[1], reply[2], reply[3]
        if name == "HandshakeError":
            raise HandshakeError(message, field)
        error = {"ValueError": ValueError, "TimeoutError": TimeoutError}.get(name, RuntimeError)
        raise error(message if error is not RuntimeError else f"{name}: {message}")

    def kill(self) -> None:
        """End the process at once (SIGKILL): its senders vanish without a word to their receivers."""
        self._process.kill()
        self._process.join(10)

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError, EOFError, TimeoutError):
                self.call("exit")
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


class RemoteDriver(SenderDriver):
    """A sender living in a :class:`SenderHost`."""

    def __init__(self, host: SenderHost, key: str) -> None:
        self._host, self._key = host, key

    def begin(self, transfer_id: int, request_id: str, dst_block_ids: Sequence[int],
              num_skip_blocks: int = 0) -> None:
        self._host.call("begin", self._key, transfer_id, request_id, list(dst_block_ids), num_skip_blocks)

    def send_layers(self, transfer_id: int, layers: Sequence[int], src_block_ids: Sequence[int],
                    block_range: tuple[int, int]) -> None:
        self._host.call("send_layers", self._key, transfer_id, list(layers), list(src_block_ids),
                        tuple(block_range))

    def send_step(self, sends: Sequence[tuple[int, Sequence[int], tuple[int, int]]], layers: Sequence[int]) -> None:
        self._host.call("send_step", self._key, [(t, list(src), tuple(r)) for t, src, r in sends], list(layers))

    def finish(self, transfer_id: int, payload: Sequence[int]) -> None:
        self._host.call("finish", self._key, transfer_id, list(payload))

    def cancel(self, transfer_id: int) -> None:
        self._host.call("cancel", self._key, transfer_id)

    def wait(self, transfer_id: int, timeout: float) -> TransferState:
        return TransferState(self._host.call("wait", self._key, transfer_id, timeout))

    def source_blocks(self, layer: int, block_ids: Sequence[int]) -> torch.Tensor:
        result = self._host.call("source_blocks", None, layer, list(block_ids))
        assert isinstance(result, torch.Tensor)
        return result

    def rewrite_block(self, block_id: int, seed: int) -> None:
        self._host.call("rewrite_block", None, block_id, seed)

    def close(self) -> float:
        return float(self._host.call("close", self._key))

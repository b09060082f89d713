"""The KV transfer interfaces: layout identity, transfer handles and states, sender and receiver.

A *prefill* worker (the sender) computes a prompt's KV into its own paged cache and streams it, layer by
layer, into blocks a *decode* worker (the receiver) allocated beforehand. Both caches use the engine's
layout (``pdserve/engine/kv_cache/tensors.py``): one tensor per layer, ``[2, num_blocks, block_size,
num_kv_heads, head_dim]``, index 0 keys and 1 values.

Block indexing. A request's blocks are numbered ``0 .. n-1`` in sequence order on both sides. The
sender's block ids (``src_block_ids``) and the receiver's (``dst_block_ids``) are two lists indexed by
that number; index ``i`` of one side lands in index ``i`` of the other. The first ``num_skip_blocks``
indices are already present on the receiver (prefix-cache hit) and are never sent or written. The
receiver may allocate more destination blocks than the sender fills (headroom); those stay untouched.

Lifecycle of one transfer (``transfer_id`` is chosen by the decode side, unique per receiver):

1. decode: ``receiver.expect(transfer_id, request_id, dst_block_ids, num_layers, deadline_s)``;
2. prefill: ``handle = sender.begin(transfer_id, request_id, dst_block_ids, num_skip_blocks)``;
3. prefill, after each layer of each chunk: ``sender.send_layer(handle, layer, kv_caches[layer],
   src_block_ids, (start, end))`` (returns at once; the copy happens behind compute); or, for every
   transfer of one forward pass together, ``step = sender.prepare_step([LayerSend(...), ...])`` once and
   ``sender.send_step_layer(step, layer, kv_caches[layer])`` after each layer (the same messages; a
   transport may move them as one copy, so the host cost per layer does not grow with the prompts);
4. prefill, once the first token is sampled: ``sender.finish(handle, [first_token_id])``;
5. prefill: the source blocks must stay allocated until ``sender.poll(handle)`` is terminal;
   decode: the request may run once ``receiver.poll(handle)`` is ``DONE``; ``handle.payload`` then
   holds the ints given to ``finish``.

Either side may ``cancel``; the receiver turns a transfer whose ``FINISH`` has not arrived by its deadline
into ``TIMED_OUT``. With a two-sided transport (gloo, NCCL: the receiver does the writes), nothing more
is written into the transfer's blocks after a receiver-side cancel or timeout, so the decode side may
free and reuse them at once. A one-sided transport (``cuda_ipc``: the sender writes into the mapped
cache) cannot be fenced by the receiver: the decode side frees such blocks once the sender's
``cancel`` returned (it returns after the writes already launched completed), or after a grace period.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any

import torch

from pdserve.common.errors import PdserveError

#: The engine's KV cache layout name (``KVCacheLayout.name``); both sides must agree on it.
LAYOUT_NAME = "layer_kv_blocks_v1"


class HandshakeError(PdserveError):
    """Two workers cannot exchange KV: their layouts differ, or the peer did not join in time.

    ``field`` names the first differing layout field when the layouts differ, else it is ``None``.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def dtype_name(dtype: torch.dtype | str) -> str:
    """The canonical short name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return name


@dataclass(frozen=True)
class KVLayoutInfo:
    """What two workers must share to copy KV blocks byte for byte (compared at the handshake)."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str = LAYOUT_NAME
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for name in ("block_size", "num_layers", "num_kv_heads", "head_dim", "tensor_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayoutInfo.{name} must be a positive int, got {value!r}")

    @classmethod
    def from_caches(cls, caches: Sequence[torch.Tensor], model: str, block_size: int | None = None,
                    tensor_parallel_size: int = 1) -> KVLayoutInfo:
        """The layout of per-layer caches ``[2, num_blocks, block_size, heads, head_dim]``.

        ``block_size``, when given, must equal the caches' block size (a cheap consistency check).
        """
        if not caches:
            raise ValueError("caches is empty: expected one tensor per layer")
        first = caches[0]
        if first.dim() != 5 or first.shape[0] != 2:
            raise ValueError(f"a KV cache layer must be [2, num_blocks, block_size, heads, head_dim], "
                             f"got shape {tuple(first.shape)}")
        if block_size is not None and block_size != first.shape[2]:
            raise ValueError(f"block_size is {block_size} but the caches hold blocks of {first.shape[2]}")
        info = cls(model=model, dtype=dtype_name(first.dtype), block_size=int(first.shape[2]),
                   num_layers=len(caches), num_kv_heads=int(first.shape[3]), head_dim=int(first.shape[4]),
                   tensor_parallel_size=tensor_parallel_size)
        info.check_caches(caches)
        return info

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVLayoutInfo:
        """Inverse of :meth:`to_dict`; missing or unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown KV layout keys: {unknown}")
        missing = sorted(n for n in names if n not in data and n not in ("layout", "tensor_parallel_size"))
        if missing:
            raise ValueError(f"missing KV layout keys: {missing}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, str | int]:
        """A JSON-ready dict (the handshake sends it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def mismatch(self, other: KVLayoutInfo) -> str | None:
        """``None`` if both layouts match, else a message naming the first differing field.

        ``self`` is this worker, ``other`` the peer: ``"block_size: this worker has 16, the peer has 32"``.
        """
        name = self.mismatch_field(other)
        if name is None:
            return None
        return f"{name}: this worker has {getattr(self, name)!r}, the peer has {getattr(other, name)!r}"

    def mismatch_field(self, other: KVLayoutInfo) -> str | None:
        """The name of the first field that differs, or ``None``."""
        for f in fields(self):
            if getattr(self, f.name) != getattr(other, f.name):
                return f.name
        return None

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    def payload_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        """The shape of ``num_blocks`` blocks of one layer, keys and values: ``[2, n, bs, heads, dim]``."""
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def payload_nbytes(self, num_blocks: int) -> int:
        """Bytes of ``num_blocks`` blocks of one layer (keys and values)."""
        element = self.torch_dtype.itemsize
        return 2 * num_blocks * self.block_size * self.num_kv_heads * self.head_dim * element

    def check_caches(self, caches: Sequence[torch.Tensor]) -> None:
        """Raise ``ValueError`` unless ``caches`` are this layout's per-layer tensors, all on the CPU or all on
        CUDA devices (a tensor-parallel worker's ranks each hold their layers on their own GPU)."""
        if len(caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} cache layers, got {len(caches)}")
        device = caches[0].device
        for i, cache in enumerate(caches):
            self.check_layer(cache, f"cache layer {i}")
            if cache.device.type != device.type:
                raise ValueError(f"cache layer {i} is on {cache.device}, layer 0 on {device}")

    def check_layer(self, cache: torch.Tensor, what: str = "the cache layer") -> None:
        """Raise ``ValueError`` unless ``cache`` is one layer of this layout, or a view of some of the KV
        heads of a larger layer (KV moved between tensor-parallel degrees,
        :func:`~pdserve.engine.kv_cache.tensors.head_group_views`) whose ``head_dim`` is contiguous (the
        block copies address the rest by strides)."""
        shape = tuple(cache.shape)
        if (len(shape) != 5 or shape[0] != 2
                or shape[2:] != (self.block_size, self.num_kv_heads, self.head_dim)):
            raise ValueError(f"{what} has shape {shape}, expected "
                             f"[2, num_blocks, {self.block_size}, {self.num_kv_heads}, {self.head_dim}]")
        if cache.dtype != self.torch_dtype:
            raise ValueError(f"{what} has dtype {cache.dtype}, expected {self.torch_dtype}")
        if cache.stride(4) != 1 or cache.stride(3) != self.head_dim:
            raise ValueError(f"{what} has strides {cache.stride()}: its head_dim and heads must be contiguous")


class TransferState(enum.Enum):
    """Where one transfer stands. The last four are terminal and never change again."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def is_terminal(self) -> bool:
        return self not in (TransferState.PENDING, TransferState.IN_PROGRESS)


@dataclass(eq=False)
class TransferHandle:
    """One transfer as seen by one side. The endpoint that returned it owns and updates it.

    ``block_ids`` are the destination block ids on both sides (the sender learns them from the
    decode side); ``payload`` is set on the receiver when the transfer is ``DONE`` (the ints the sender
    passed to ``finish``: the first token ids). ``created_at``/``deadline_at`` are ``time.monotonic()``
    values; the sender has no deadline (its stalls surface as ``FAILED`` through the transport timeout).
    ``marks`` holds ``time.time()`` stamps of the transport's milestones, for latency breakdowns that
    compare the two sides' clocks on one host: ``finish_called_at`` and ``finish_pushed_at`` (the FINISH
    header about to leave) on the sender, ``finish_received_at`` on the receiver.
    """

    transfer_id: int
    request_id: str
    peer: str
    block_ids: tuple[int, ...]
    num_layers: int
    num_skip_blocks: int = 0
    state: TransferState = TransferState.PENDING
    error: str | None = None
    payload: list[int] | None = None
    created_at: float = field(default_factory=time.monotonic)
    deadline_at: float | None = None
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def first_token(self) -> int | None:
        """The first int of the completion payload (the first sampled token), once it arrived."""
        return self.payload[0] if self.payload else None


def check_block_ids(block_ids: Sequence[int], num_blocks: int, what: str) -> tuple[int, ...]:
    """``block_ids`` as a tuple of ints in ``[0, num_blocks)``, or ``ValueError``."""
    ids = tuple(block_ids)
    if not set(map(type, ids)) <= {int}:  # C-speed: this runs per layer on long block lists
        bad = next(b for b in ids if type(b) is not int)
        raise ValueError(f"{what} must be ints, got {bad!r}")
    if ids and (min(ids) < 0 or max(ids) >= num_blocks):
        raise ValueError(f"{what} must lie in [0, {num_blocks}), got {min(ids)}..{max(ids)}")
    return ids


@dataclass(frozen=True, eq=False)
class LayerSend:
    """One transfer's part of a forward pass: what each layer's ``send_layer`` call would name."""

    handle: TransferHandle
    src_block_ids: Sequence[int]
    block_range: tuple[int, int]


class _Closable(abc.ABC):
    @abc.abstractmethod
    def close(self) -> None:
        """Release the endpoint; returns promptly (bounded), never waits on a stalled peer forever."""

    def __enter__(self) -> _Closable:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class KVSender(_Closable):
    """The prefill side of one channel to one receiver. Methods are thread-safe.

    ``send_layer`` and ``finish`` only enqueue; messages reach the receiver in call order (FIFO), so a
    block sent twice (a partial block re-sent by a later prefill chunk) ends up with the later content.
    """

    @property
    @abc.abstractmethod
    def layout(self) -> KVLayoutInfo:
        """The layout of this side's caches (checked against the peer at the handshake)."""

    @abc.abstractmethod
    def begin(self, transfer_id: int, request_id: str, dst_block_ids: Sequence[int],
              num_skip_blocks: int = 0) -> TransferHandle:
        """Start a transfer the receiver already ``expect``-ed. Cheap; sends nothing yet."""

    @abc.abstractmethod
    def send_layer(self, handle: TransferHandle, layer: int, kv_cache_layer: torch.Tensor,
                   src_block_ids: Sequence[int], block_range: tuple[int, int]) -> None:
        """Enqueue blocks ``block_range = (start, end)`` (indices into the request's block list) of
        ``layer``: source ``src_block_ids[start:end]`` of ``kv_cache_layer``, destination
        ``dst_block_ids[start:end]``; indices below ``num_skip_blocks`` are dropped.

        Returns at once (called from the forward pass after each layer). On CUDA it records an event on
        the current stream; the copy runs on a transfer stream after that event, so the caller may go on
        writing other blocks. The source blocks must keep their content until the transfer is terminal,
        except that later writes into a block that is sent again later are fine. A transfer that is
        already terminal (cancelled, failed) ignores the call. Bad arguments raise ``ValueError``.
        """

    def prepare_step(self, sends: Sequence[LayerSend]) -> Any:
        """What every layer of one forward pass sends, for :meth:`send_step_layer` (the step's layers
        only; prepare again for the next step). Transports check the arguments here, once, and may move
        several transfers' blocks of a layer as one copy; this default sends them one by one."""
        return list(sends)

    def send_step_layer(self, step: Any, layer: int, kv_cache_layer: torch.Tensor) -> None:
        """``send_layer(s.handle, layer, kv_cache_layer, s.src_block_ids, s.block_range)`` for every
        ``s`` of the prepared ``step``, in order, with the same contract (a transfer that turned terminal
        meanwhile is skipped)."""
        for send in step:
            self.send_layer(send.handle, layer, kv_cache_layer, send.src_block_ids, send.block_range)

    @abc.abstractmethod
    def finish(self, handle: TransferHandle, payload: Sequence[int]) -> None:
        """Enqueue the final message, carrying ``payload`` (the first token ids); no ``send_layer``
        for this transfer may follow."""

    @abc.abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState:
        """The transfer's state; ``DONE`` once every message was handed over and completed."""

    @abc.abstractmethod
    def cancel(self, handle: TransferHandle) -> None:
        """Drop the transfer's unsent messages and tell the receiver (its handle turns ``FAILED``)."""

    def wait(self, handle: TransferHandle, timeout: float) -> TransferState:
        """Poll until the transfer is terminal or ``timeout`` seconds passed; returns the state."""
        end = time.monotonic() + timeout
        delay = 1e-4
        while True:
            state = self.poll(handle)
            if state.is_terminal or time.monotonic() >= end:
                return state
            time.sleep(min(delay, max(0.0, end - time.monotonic())))
            delay = min(delay * 2, 0.01)


class KVReceiver(_Closable):
    """The decode side: receives transfers into pre-allocated blocks of its caches. Thread-safe."""

    @property
    @abc.abstractmethod
    def layout(self) -> KVLayoutInfo:
        """The layout of this side's caches."""

    @abc.abstractmethod
    def expect(self, transfer_id: int, request_id: str, dst_block_ids: Sequence[int], num_layers: int,
               deadline_s: float, on_terminal: Callable[[TransferHandle], None] | None = None) -> TransferHandle:
        """Register a transfer before the sender starts it. ``dst_block_ids`` is the request's whole
        block list on this side; the transfer must complete within ``deadline_s`` seconds from now or
        it turns ``TIMED_OUT``. ``transfer_id`` must be unique (not reused while old messages may still
        arrive). Bad arguments raise ``ValueError``. ``on_terminal(handle)`` is called once when the
        transfer turns terminal (``DONE`` only once every byte is in the cache), from a receiver
        thread, never under the receiver's lock; it must not block."""

    @abc.abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState:
        """The state; ``DONE`` only once the final message arrived and every byte is in the cache
        (on CUDA: the transfer stream's writes completed), so the blocks can be read right away."""

    @abc.abstractmethod
    def wait(self, handle: TransferHandle, timeout: float) -> TransferState:
        """Block until the transfer is terminal or ``timeout`` seconds passed; returns the state."""

    @abc.abstractmethod
    def cancel(self, handle: TransferHandle) -> None:
        """Give the transfer up (``CANCELLED``). When this returns nothing more is written into its
        blocks; its later messages are received and discarded."""

"""Small device helpers shared by the transports: events, index tensors, bounded waits.

On CPU every helper is a no-op or synchronous. On CUDA, nothing here synchronises a stream the caller
did not ask for: index tensors go through pinned memory with a non-blocking copy on the current stream,
and waits on events poll with a deadline instead of blocking forever.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: A ``torch.cuda.Event``, or ``None`` on CPU (where work is already done when the call returns).
Event = Any


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


class NeverDone:
    """An event that never completes: what writes whose completion cannot be observed any more (the device
    failed while they were posted) are fenced with, so their blocks are given back only by the fence's
    timeout, after their peer was abandoned."""

    def query(self) -> bool:
        return False


def record_event(device: torch.device) -> Event:
    """An event recorded on the current stream of ``device`` (``None`` on CPU)."""
    if not is_cuda(device):
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def event_done(event: Event) -> bool:
    """Whether the work before ``event`` finished (always true for ``None``)."""
    return event is None or bool(event.query())


def wait_event(event: Event, deadline: float | None = None,
               should_stop: Callable[[], bool] | None = None) -> bool:
    """Wait until ``event`` completed; ``False`` if ``deadline`` (monotonic) passed or ``should_stop()``
    turned true first. Polls with a growing sleep (at most 1 ms), so it never hangs on a stuck stream."""
    delay = 2e-5
    while not event_done(event):
        if (deadline is not None and time.monotonic() >= deadline) or (should_stop and should_stop()):
            return False
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)
    return True


_INDEX_CACHE: collections.OrderedDict[tuple[Any, ...], torch.Tensor] = collections.OrderedDict()
_INDEX_CACHE_SIZE = 256
_INDEX_LOCK = threading.Lock()


def index_tensor(ids: Sequence[int] | Callable[[], Sequence[int]], device: torch.device,
                 key: Any = None) -> torch.Tensor:
    """``ids`` as an int64 tensor on ``device``; on CUDA copied from pinned memory on the current
    stream without blocking the host (the caching host allocator keeps the source alive).

    On CUDA the result is memoised per (stream, ``key``), ``key`` defaulting to the ids themselves: the
    layers of one transfer share their block ids, and pinning plus a copy per message was the largest
    host cost per message. A caller with a short description of long ids passes it as ``key`` and
    ``ids`` as a function that builds them (called on a miss only). A memoised tensor is only reused
    on the stream that created it, so its copy is ordered before every use.
    """
    if not is_cuda(device):
        return torch.tensor(ids() if callable(ids) else ids, dtype=torch.int64)
    if key is None:
        assert not callable(ids), "a lazy index tensor needs a key"
        key = tuple(ids)
    cache_key = (str(device), torch.cuda.current_stream(device).cuda_stream, key)
    with _INDEX_LOCK:
        cached = _INDEX_CACHE.get(cache_key)
        if cached is not None:
            _INDEX_CACHE.move_to_end(cache_key)
            return cached
    values = ids() if callable(ids) else ids
    tensor = torch.tensor(values, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    with _INDEX_LOCK:
        _INDEX_CACHE[cache_key] = tensor
        while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    return tensor


def enable_peer_access(devices: Sequence[torch.device]) -> bool:
    """Let every GPU of ``devices`` read and write every other's memory from this process's kernels
    (torch enables peer access between two GPUs on their first copy); ``False`` (nothing enabled) when
    some pair cannot. One GPU, or none, needs nothing."""
    indices = sorted({device.index or 0 for device in devices if is_cuda(device)})
    pairs = [(a, b) for a in indices for b in indices if a != b]
    if not all(torch.cuda.can_device_access_peer(a, b) for a, b in pairs):
        return False
    for a, b in pairs:
        torch.empty(1, device=f"cuda:{b}").copy_(torch.zeros(1, device=f"cuda:{a}"))
    return True


def spread_problem(caches: Sequence[torch.Tensor]) -> str | None:
    """``None`` when a transport can move ``caches`` from this process: they sit on one device, or on GPUs
    that can now access each other's memory (a tensor-parallel worker's ranks; peer access enabled here),
    else why not."""
    devices = list(dict.fromkeys(cache.device for cache in caches))
    if len(devices) < 2 or enable_peer_access(devices):
        return None
    return (f"this worker's KV cache spans {', '.join(map(str, devices))} (tensor-parallel ranks), GPUs that cannot "
            f"access each other's memory; the KV transports copy every rank's blocks through one GPU")

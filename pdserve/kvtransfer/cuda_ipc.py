"""CUDA IPC for KV caches: the decode worker exports its cache tensors, a prefill worker on the same host
maps them and writes KV blocks into them directly (:class:`~pdserve.kvtransfer.ipc_sender.IpcSender`).

Why: streaming over an NCCL pair costs the receiving process a Python wake-up per message (header pop,
receive, scatter), which competes with its decode loop for the GIL; under load that, not the link, set
the handoff time. A one-sided write needs nothing from the receiving process until the final FINISH.

How: :func:`export_caches` (receiver) turns each layer's storage into a CUDA IPC handle
(``UntypedStorage._share_cuda_``, what ``torch.multiprocessing`` uses) and describes it as JSON.
:func:`map_caches` (sender) opens every handle *while its own device is current*: the driver then maps
the peer's memory into this device's context with peer access, and the tensors are labelled with this
device, so a kernel launched here stores into the peer GPU over NVLink. Either side may be a
tensor-parallel worker whose ranks hold their layers on several GPUs: each exported layer (or view of
some heads of one) is mapped for the sender's GPU that writes it (:func:`map_caches`). Each worker keeps seeing only
its own GPU (Ray's ``CUDA_VISIBLE_DEVICES`` need not change). Mapping fails on another host, or where
the driver refuses; :class:`IpcUnavailable` says why and the caller falls back to NCCL.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pdserve.kvtransfer.base import KVLayoutInfo

EXPORT_VERSION = 1


class IpcUnavailable(RuntimeError):
    """These caches cannot be mapped here (another host, another driver, no CUDA)."""


def host_identity() -> str:
    """What identifies this machine's kernel: its boot id (shared by containers on one host)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def export_caches(caches: Sequence[torch.Tensor]) -> dict[str, Any]:
    """JSON-able IPC handles of every layer of ``caches`` (CUDA tensors; they must stay alive)."""
    layers = []
    for cache in caches:
        if cache.device.type != "cuda":
            raise ValueError(f"only CUDA caches can be exported, got {cache.device}")
        share = cache.untyped_storage()._share_cuda_()
        layers.append({"share": [_encode(v) for v in share[1:]], "offset": cache.storage_offset(),
                       "shape": list(cache.shape), "stride": list(cache.stride())})
    return {"version": EXPORT_VERSION, "host": host_identity(), "layers": layers}


def map_caches(export: dict[str, Any] | None, layout: KVLayoutInfo,
               writers: Sequence[torch.device]) -> list[torch.Tensor]:
    """The peer's caches described by ``export``, each mapped into the context of the device that will
    write it and labelled with that device: layer ``i`` into ``writers[i]``'s (the sender's own layer
    ``i``), unless an earlier layer from the same allocation was mapped already, then into that one's
    device (an allocation is mapped once per process; with a tensor-parallel sender of a higher degree
    several ranks write views of one receiver layer, and the later ranks' copies read their source
    over peer access from the device that mapped it).

    Raises :class:`IpcUnavailable` when they cannot be mapped here, ``ValueError`` on a malformed export.
    """
    if export is None:
        raise IpcUnavailable("the receiver exported no CUDA IPC handles")
    if any(device.type != "cuda" for device in writers):
        raise IpcUnavailable(f"CUDA IPC needs CUDA caches, these are on {sorted({str(d) for d in writers})}")
    if export.get("version") != EXPORT_VERSION:
        raise ValueError(f"unknown CUDA IPC export version {export.get('version')!r}")
    if export.get("host") != host_identity():
        raise IpcUnavailable("the receiver runs on another host")
    layers = export.get("layers", [])
    if len(layers) != layout.num_layers or len(writers) != layout.num_layers:
        raise ValueError(f"the receiver exported {len(layers)} cache layers for {len(writers)} writers, the layout "
                         f"has {layout.num_layers}")
    torch.cuda.init()  # opening a handle needs an initialised runtime
    mapped = []
    mapped_on: dict[str, int] = {}  # allocation handle -> the device it was mapped into
    try:
        for layer, writer in zip(layers, writers, strict=True):
            index = mapped_on.setdefault(str(layer["share"][0]), writer.index if writer.index is not None
                                         else torch.cuda.current_device())
            with torch.cuda.device(index):
                share = [_decode(v) for v in layer["share"]]
                storage = torch.UntypedStorage._new_shared_cuda(index, *share)
                tensor = torch.empty(0, dtype=layout.torch_dtype, device=torch.device("cuda", index))
                tensor.set_(storage, int(layer["offset"]), tuple(layer["shape"]), tuple(layer["stride"]))
                layout.check_layer(tensor, "a mapped cache layer")
                mapped.append(tensor)
    except (RuntimeError, OSError) as e:
        raise IpcUnavailable(f"opening the receiver's CUDA IPC handles failed: {e}") from None
    return mapped


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if value is None or isinstance(value, (bool, int)):
        return value
    raise TypeError(f"unexpected value in a CUDA IPC share: {value!r}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return base64.b64decode(value["b64"])
    return value

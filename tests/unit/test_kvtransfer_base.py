"""Unit tests of the KV transfer building blocks: layout identity, states, headers, backend choice,
and the package's import rules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from pdserve.common.errors import PdserveError
from pdserve.kvtransfer import (
    LAYOUT_NAME,
    HandshakeError,
    Header,
    KVLayoutInfo,
    MessageKind,
    TransferHandle,
    TransferState,
    resolve_backend,
)
from pdserve.kvtransfer.messages import HEADER_NBYTES, MAGIC, ProtocolError, check_payload_ints

PACKAGE = Path(__file__).resolve().parents[2] / "pdserve" / "kvtransfer"


def _layout(**changes: object) -> KVLayoutInfo:
    values: dict[str, object] = {"model": "llama-3.1-8b", "dtype": "bfloat16", "block_size": 16,
                                 "num_layers": 32, "num_kv_heads": 8, "head_dim": 128}
    values.update(changes)
    return KVLayoutInfo(**values)  # type: ignore[arg-type]


def test_equal_layouts_match() -> None:
    assert _layout().mismatch(_layout()) is None
    assert _layout().layout == LAYOUT_NAME and _layout().tensor_parallel_size == 1


@pytest.mark.parametrize(("field", "value"), [
    ("model", "qwen-7b"), ("dtype", "float16"), ("block_size", 32), ("num_layers", 16),
    ("num_kv_heads", 4), ("head_dim", 64), ("layout", "other_layout_v2"), ("tensor_parallel_size", 2),
])
def test_mismatch_names_the_field_and_both_values(field: str, value: object) -> None:
    mine, theirs = _layout(), _layout(**{field: value})
    message = mine.mismatch(theirs)
    assert message == f"{field}: this worker has {getattr(mine, field)!r}, the peer has {value!r}"
    assert mine.mismatch_field(theirs) == field


def test_mismatch_reports_the_first_differing_field() -> None:
    assert _layout().mismatch(_layout(block_size=32, head_dim=64)) == \
        "block_size: this worker has 16, the peer has 32"


def test_dict_round_trip_and_validation() -> None:
    layout = _layout(tensor_parallel_size=4)
    assert KVLayoutInfo.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="unknown KV layout keys"):
        KVLayoutInfo.from_dict({**layout.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="missing KV layout keys"):
        KVLayoutInfo.from_dict({"model": "m"})


def test_layout_normalises_and_checks_values() -> None:
    assert _layout(dtype="torch.float32").dtype == "float32"
    with pytest.raises(ValueError, match="unknown torch dtype"):
        _layout(dtype="float99")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        _layout(block_size=0)


def test_from_caches_reads_the_shape() -> None:
    caches = [torch.zeros(2, 10, 4, 2, 8, dtype=torch.float16) for _ in range(3)]
    layout = KVLayoutInfo.from_caches(caches, "m", block_size=4)
    assert (layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim, layout.dtype) == \
        (3, 4, 2, 8, "float16")
    assert layout.payload_shape(5) == (2, 5, 4, 2, 8)
    assert layout.payload_nbytes(5) == 2 * 5 * 4 * 2 * 8 * 2
    with pytest.raises(ValueError, match="block_size is 16"):
        KVLayoutInfo.from_caches(caches, "m", block_size=16)
    with pytest.raises(ValueError, match=r"\[2, num_blocks"):
        KVLayoutInfo.from_caches([torch.zeros(10, 4, 2, 8)], "m")
    with pytest.raises(ValueError, match="dtype"):
        KVLayoutInfo.from_caches([caches[0], caches[1].float(), caches[2]], "m")
    # views of some KV heads (KV between tensor-parallel degrees) pass; strides the block copy cannot follow not
    wide = torch.zeros(2, 10, 4, 4, 8, dtype=torch.float16)
    halves = [wide.narrow(3, 0, 2), wide.narrow(3, 2, 2)]
    assert KVLayoutInfo.from_caches(halves, "m").num_kv_heads == 2
    with pytest.raises(ValueError, match="head_dim and heads must be contiguous"):
        KVLayoutInfo.from_caches([torch.zeros(2, 10, 4, 8, 2, dtype=torch.float16).transpose(3, 4)], "m")


def test_states_and_handle() -> None:
    terminal = {s for s in TransferState if s.is_terminal}
    assert terminal == {TransferState.DONE, TransferState.FAILED, TransferState.CANCELLED,
                        TransferState.TIMED_OUT}
    handle = TransferHandle(1, "r", "peer", (3, 4), 2)
    assert handle.state is TransferState.PENDING and handle.first_token is None
    handle.payload = [42, 1]
    assert handle.first_token == 42


def test_handshake_error_is_a_pdserve_error() -> None:
    error = HandshakeError("block_size: ...", "block_size")
    assert isinstance(error, PdserveError) and error.field == "block_size"


def test_header_round_trip() -> None:
    layer = Header(MessageKind.LAYER, transfer_id=7, layer=3, start=2, num_blocks=5, payload_nbytes=1280)
    assert Header.unpack(layer.pack()) == layer
    assert len(layer.pack()) == HEADER_NBYTES
    finish = Header(MessageKind.FINISH, transfer_id=2 ** 40, start=1, num_blocks=9, num_messages=64,
                    ints=(128000, -1))
    assert Header.unpack(finish.pack()) == finish
    assert len(finish.pack()) == HEADER_NBYTES + 16


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 12, Header(MessageKind.CLOSE).pack()[:-8],
    Header(MessageKind.CLOSE).pack().replace(MAGIC.to_bytes(8, "little"), (7).to_bytes(8, "little")),
    Header(MessageKind.CLOSE).pack()[:8] + (99).to_bytes(8, "little") + Header(MessageKind.CLOSE).pack()[16:],
])
def test_header_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        Header.unpack(data)


def test_payload_ints_are_checked() -> None:
    assert check_payload_ints([1, 2]) == (1, 2)
    for bad in ("12", [1.5], [True], [2 ** 63], list(range(5000))):
        with pytest.raises(ValueError):
            check_payload_ints(bad)


@pytest.mark.parametrize(("name", "device", "expected"), [
    ("auto", "cpu", "gloo"), ("auto", "cuda:0", "cuda_ipc"), ("AUTO", "cuda", "cuda_ipc"), ("gloo", "cpu", "gloo"),
    ("nccl", "cuda:1", "nccl"), ("cuda_ipc", "cuda:1", "cuda_ipc"), ("loopback", "cpu", "loopback"), ("loopback", "cuda", "loopback"),
])
def test_resolve_backend(name: str, device: str, expected: str) -> None:
    assert resolve_backend(name, device) == expected


@pytest.mark.parametrize(("name", "device", "message"), [
    ("nccl", "cpu", "needs CUDA KV caches"), ("cuda_ipc", "cpu", "needs CUDA KV caches"), ("gloo", "cuda:0", "CPU KV caches only"),
    ("mpi", "cpu", "unknown KV transfer backend 'mpi'"),
])
def test_resolve_backend_rejects(name: str, device: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_backend(name, device)


def test_package_imports_only_torch_and_common() -> None:
    forbidden = ("ray", "grpc", "pdserve.prefill", "pdserve.decode", "pdserve.router", "pdserve.cluster",
                 "pdserve.engine", "pdserve.client")
    bad = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{path.name}: {n}" for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert not bad

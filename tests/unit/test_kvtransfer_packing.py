"""Packing a planned message with one launch per layer gives the wire bytes the per-part layout defines,
and unpacking writes exactly the claimed parts."""

from __future__ import annotations

import torch

from pdserve.kvtransfer import KVLayoutInfo
from pdserve.kvtransfer.messages import Header, MessageKind, gather_blocks
from pdserve.kvtransfer.packing import layer_runs, pack_message, run_positions, unpack_message
from pdserve.kvtransfer.plan import PlannedMessage, message_buffers, part_payloads

LAYOUT = KVLayoutInfo(model="m", dtype="float32", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8)


def _part(tid: int, layer: int, num_blocks: int) -> Header:
    return Header(MessageKind.LAYER, tid, layer, 0, num_blocks, LAYOUT.payload_nbytes(num_blocks))


def _index(ids: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


def test_runs_and_positions_follow_the_payload_layout() -> None:
    message = PlannedMessage((_part(1, 0, 2), _part(2, 0, 1), _part(1, 1, 2)))
    runs = layer_runs(message)
    assert [(r.layer, r.start, r.parts, r.sizes) for r in runs] == [(0, 0, (0, 1), (2, 1)), (1, 6, (2,), (2,))]
    assert runs[0].offsets() == [0, 4] and runs[1].offsets() == [0]
    assert run_positions([(0, 2), (4, 1)]) == (0, 1, 4, 2, 3, 5)  # keys of both parts, then values


def test_packing_matches_the_per_part_layout_and_unpacking_skips_unclaimed_parts() -> None:
    gen = torch.Generator().manual_seed(3)
    src = [torch.randn(2, 10, 4, 2, 8, generator=gen) for _ in range(2)]
    message = PlannedMessage((_part(1, 0, 2), _part(2, 0, 1), _part(1, 1, 2), _part(3, 1, 1)))
    src_ids = [(7, 2), (9,), (7, 2), (0,)]
    sources = [(src[p.layer], ids) for p, ids in zip(message.parts, src_ids)]
    packed, _ = message_buffers(message, "cpu")
    pack_message(message, sources, packed, LAYOUT)
    per_part, _ = message_buffers(message, "cpu")
    for (part, view), ids in zip(part_payloads(message, per_part, LAYOUT), src_ids):
        gather_blocks(src[part.layer], _index(ids), out=view)
    assert torch.equal(packed, per_part)
    # parts of one layer that read two different tensors (copies here) pack the same
    copies = [(src[p.layer].clone() if i == 2 else src[p.layer], ids)
              for i, (p, ids) in enumerate(zip(message.parts, src_ids))]
    repacked, _ = message_buffers(message, "cpu")
    pack_message(message, copies, repacked, LAYOUT)
    assert torch.equal(repacked, per_part)

    dst = [torch.zeros(2, 12, 4, 2, 8) for _ in range(2)]
    targets: list[tuple[int, ...] | None] = [(3, 11), None, (5, 6), (1,)]  # transfer 2 is not claimed
    unpack_message(message, targets, packed, dst, LAYOUT)
    for part, ids, target in zip(message.parts, src_ids, targets):
        if target is not None:
            assert torch.equal(dst[part.layer][:, list(target)], src[part.layer][:, list(ids)])
    written = {0: {3, 11}, 1: {5, 6, 1}}
    for layer, blocks in written.items():
        untouched = [b for b in range(12) if b not in blocks]
        assert bool((dst[layer][:, untouched] == 0).all())


def test_a_lone_part_packs_through_its_own_view() -> None:
    src = torch.randn(2, 6, 4, 2, 8)
    message = PlannedMessage((_part(4, 1, 3),))
    packed, _ = message_buffers(message, "cpu")
    pack_message(message, [(src, (5, 0, 2))], packed, LAYOUT)
    ((_, view),) = part_payloads(message, packed, LAYOUT)
    assert torch.equal(view, src[:, [5, 0, 2]])


def test_a_runs_positions_are_built_from_its_parts_sizes() -> None:
    from pdserve.kvtransfer.packing import _positions

    positions = _positions(((0, 2), (4, 1)), torch.device("cpu"))
    assert positions.tolist() == [[0, 1, 4], [2, 3, 5]]

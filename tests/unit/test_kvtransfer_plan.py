"""Send plans: wire round trip, grouping rules, and plans landing exactly (split, staged, multi-part)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from pdserve.kvtransfer import KVLayoutInfo, TransferState, open_receiver, pg_sender
from pdserve.kvtransfer.messages import Header, MessageKind, ProtocolError
from pdserve.kvtransfer.plan import (
    PlannedMessage,
    coalesce_ready,
    decode_plan,
    encode_plan,
    group_parts,
    is_contiguous,
    launches,
)
from pdserve.kvtransfer.process_group import open_sender


def _part(tid: int, layer: int, nbytes: int = 64, start: int = 0, num_blocks: int = 1) -> Header:
    return Header(MessageKind.LAYER, tid, layer, start, num_blocks, nbytes)


def test_plan_round_trip() -> None:
    plan = [PlannedMessage((_part(1, 0, 128),), split=True),
            PlannedMessage((_part(1, 1), _part(2, 1, 32, start=3, num_blocks=2)))]
    header = encode_plan(plan)
    assert header.payload_nbytes == 224 and header.num_messages == 2
    assert decode_plan(Header.unpack(header.pack())) == plan
    assert plan[0].send_sizes() == (64, 64) and plan[1].send_sizes() == (96,)


@pytest.mark.parametrize("ints", [
    (1, 0, 1, 0, 0, 1, 64, 99),            # one int too many
    (2, 0, 1, 0, 0, 1, 64),                # ends inside the second part
    (1, 4, 1, 0, 0, 1, 64),                # flags beyond split (1) and joins-previous (2)
    (1, 2, 1, 0, 0, 1, 64),                # the first message cannot join a previous launch
    (2, 1, 1, 0, 0, 1, 32, 2, 0, 0, 1, 32),  # split with two parts
    (1, 0, 1, 0, 0, 1, 0),                 # an empty part
])
def test_malformed_plans_are_refused(ints: tuple[int, ...]) -> None:
    nbytes = sum(ints[6::5]) if len(ints) >= 7 else 0
    with pytest.raises(ProtocolError):
        decode_plan(Header(MessageKind.PLAN, num_messages=1, payload_nbytes=nbytes, ints=ints))


def test_grouping_keeps_layers_whole_and_groups_small_ones() -> None:
    parts = [_part(t, layer, 10) for layer in range(4) for t in (1, 2)]
    # big minimum: everything in one message (within the maximum)
    assert [len(m.parts) for m in group_parts(parts, lambda i: True, 1000, 1000)] == [8]
    # minimum of one layer's bytes: one message per layer, both transfers' parts together, none split
    grouped = group_parts(parts, lambda i: True, 20, 1000)
    assert [[(p.transfer_id, p.layer) for p in m.parts] for m in grouped] == \
        [[(1, layer), (2, layer)] for layer in range(4)]
    assert not any(m.split for m in grouped)
    # a lone part is split only when its destination is contiguous; the maximum splits a layer
    alone = group_parts([_part(1, 0, 10), _part(1, 1, 10)], lambda i: i == 0, 0, 1000)
    assert [m.split for m in alone] == [True, False]
    assert [len(m.parts) for m in group_parts(parts, lambda i: True, 1000, 30)] == [3, 3, 2]


def test_grouping_merges_layers_already_computed() -> None:
    parts = [_part(1, layer, 10) for layer in range(6)]
    # layers 0-3 computed when the plan is made: one message (up to the maximum); 4 and 5 one by one
    ready = [True, True, True, True, False, False]
    grouped = group_parts(parts, lambda i: False, 10, 1000, ready)
    assert [[p.layer for p in m.parts] for m in grouped] == [[0, 1, 2, 3], [4], [5]]
    assert [len(m.parts) for m in group_parts(parts, lambda i: False, 10, 25, ready)] == [2, 2, 1, 1]


def test_coalesced_launches_cover_ready_runs_within_the_byte_limit() -> None:
    messages = [PlannedMessage((_part(1, layer, 10),)) for layer in range(6)]
    ready = [True, True, True, False, True, True]
    marked = coalesce_ready(messages, ready, 25)
    # 0+1 fill the limit (20 bytes; 30 would pass it), 2 starts a launch, 3 is not computed, 4+5 join
    assert [m.joins_previous for m in marked] == [False, True, False, False, False, True]
    assert list(launches(marked)) == [[0, 1], [2], [3], [4, 5]]
    assert decode_plan(Header.unpack(encode_plan(marked).pack())) == marked
    assert list(launches(coalesce_ready(messages, [False] * 6, 1000))) == [[i] for i in range(6)]


def test_is_contiguous() -> None:
    assert is_contiguous([4, 5, 6]) and is_contiguous([9]) and not is_contiguous([4, 6]) and not is_contiguous([5, 4])


def _roundtrip(dst_ids: list[int], src_ids: list[int], monkeypatch: pytest.MonkeyPatch, max_bytes: int,
               second: bool, layer_gap_s: float = 0.0,
               before_finish: Callable[[list[PlannedMessage]], None] | None = None) -> list[PlannedMessage]:
    """Transfer ``src_ids`` -> ``dst_ids`` (and, with ``second``, one more block of another transfer
    interleaved layer by layer) over gloo; returns the messages the sender planned. (On CPU every layer
    is computed already, so parts merge up to ``max_bytes``.) ``layer_gap_s`` between layers, as a
    forward pass spaces them; ``before_finish`` sees what was planned before the FINISH messages."""
    monkeypatch.setattr(pg_sender, "MIN_MESSAGE_BYTES", 0)
    monkeypatch.setattr(pg_sender, "MAX_MESSAGE_BYTES", max_bytes)
    monkeypatch.setattr(pg_sender, "MIN_SPLIT_BYTES", 0)
    planned: list[PlannedMessage] = []

    def spy(messages: list[PlannedMessage]) -> Header:
        planned.extend(messages)
        return encode_plan(messages)

    monkeypatch.setattr(pg_sender, "encode_plan", spy)
    layout = KVLayoutInfo(model="m", dtype="float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=8)
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(2, 16, 4, 2, 8, generator=gen) for _ in range(3)]
    dst = [torch.zeros(2, 16, 4, 2, 8) for _ in range(3)]
    receiver, bootstrap = open_receiver("127.0.0.1", 0, "plan-test", caches=dst, layout=layout, backend="gloo")
    made: list = []
    opener = threading.Thread(target=lambda: made.append(open_sender(bootstrap, src, layout)))
    opener.start()
    opener.join(30)
    (sender,) = made
    try:
        transfers = [(1, dst_ids, src_ids)] + ([(2, [15], [0])] if second else [])
        handles = [(receiver.expect(tid, f"r{tid}", ids, 3, 30.0), sender.begin(tid, f"r{tid}", ids), srcs)
                   for tid, ids, srcs in transfers]
        for layer in range(3):
            time.sleep(layer_gap_s if layer else 0.0)
            for _, sent, srcs in handles:
                sender.send_layer(sent, layer, src[layer], srcs, (0, len(srcs)))
        if before_finish is not None:
            before_finish(planned)
        for _, sent, _ in handles:
            sender.finish(sent, [sent.transfer_id])
        for expected, _, _ in handles:
            assert receiver.wait(expected, 30.0) is TransferState.DONE, expected.error
        written = []
        for _, ids, srcs in transfers:
            written += ids
            for layer in range(3):
                assert torch.equal(dst[layer][:, ids], src[layer][:, srcs])
        untouched = [b for b in range(16) if b not in written]
        assert all(bool((d[:, untouched] == 0).all()) for d in dst)
    finally:
        sender.close()
        receiver.close()
    return planned


PART = 768  # bytes of one layer of 3 blocks here (a lone block: 256)


@pytest.mark.parametrize("dst_ids, src_ids, max_bytes, second, shape", [
    ([4, 5, 6], [9, 10, 11], PART, False, "split"),        # contiguous on both sides: sent from the cache
    ([4, 5, 6], [11, 2, 7], PART, False, "split"),         # contiguous destination, gathered source
    ([6, 2, 9], [1, 2, 3], PART, False, "single"),         # scattered destination: staged
    ([4, 5, 6], [9, 10, 11], PART + 256, True, "per-layer"),  # two transfers: one message per layer
    ([4, 5, 6], [9, 10, 11], 1 << 30, True, "one"),        # every part of the plan in one message
])
def test_plans_land_exactly(dst_ids: list[int], src_ids: list[int], max_bytes: int, second: bool, shape: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    planned = _roundtrip(dst_ids, src_ids, monkeypatch, max_bytes, second)
    if shape == "split":
        assert planned and all(m.split and len(m.parts) == 1 for m in planned)
    elif shape == "single":
        assert planned and all(not m.split and len(m.parts) == 1 for m in planned)
    elif shape == "per-layer":
        # (a plan holds what was queued when it was made, so a layer's two parts may fall in two plans)
        assert all(len({p.layer for p in m.parts}) == 1 for m in planned) and sum(len(m.parts) for m in planned) == 6
    else:
        assert sum(len(m.parts) for m in planned) == 6 and len(planned) <= 3  # plans may end early


def test_plans_that_wait_for_more_layers_still_land_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the extra wait for later layers on (it ends once the last layer is queued), every part is
    planned once and lands where it belongs."""
    monkeypatch.setattr(pg_sender, "PLAN_EXTRA_WAIT_S", 0.05)
    planned = _roundtrip([4, 5, 6], [9, 10, 11], monkeypatch, PART + 256, True)
    assert sum(len(m.parts) for m in planned) == 6


def test_a_plan_gathering_layers_is_woken_by_the_last_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender gathering a plan (a minute of extra wait) while layers come 0.2 s apart is not ended by
    the layers before the last, and is by the last one: the plan holds every part before any FINISH."""
    monkeypatch.setattr(pg_sender, "PLAN_EXTRA_WAIT_S", 60.0)

    def all_planned(planned: list[PlannedMessage]) -> None:
        end = time.monotonic() + 20.0
        while sum(len(m.parts) for m in planned) < 6 and time.monotonic() < end:
            time.sleep(0.01)
        assert sum(len(m.parts) for m in planned) == 6, "the last layer did not end the gathering"
        assert len(planned) == 1, "a layer before the last ended the gathering"

    _roundtrip([4, 5, 6], [9, 10, 11], monkeypatch, 1 << 30, True, layer_gap_s=0.2, before_finish=all_planned)

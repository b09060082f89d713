"""The runner's persistent input buffers: what a CUDA graph captures must stay valid for every replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.attention.metadata import LaunchShape
from pdserve.engine.request import Request
from pdserve.engine.step_inputs import FedTokens, StepInputs
from pdserve.engine.step_plan import ScheduledChunk


def _inputs() -> StepInputs:
    return StepInputs(64, 8, 16, 4, torch.device("cpu"), query_tile_rows=16)


def test_every_view_points_at_its_buffer_even_with_no_sequences() -> None:
    """A graph is captured over a batch of padding only: empty views would carry a null data_ptr()
    into the graph (an illegal address at replay), so every view starts at its persistent buffer."""
    inputs = _inputs()
    meta = inputs.load_padding(LaunchShape(16, 8, 2, 4))
    buffers = inputs.dev
    for name in ("query_start_loc", "seq_lens", "context_lens", "block_tables", "slot_mapping"):
        view = getattr(meta, name)
        assert view.numel() > 0 and view.data_ptr() == buffers[name].data_ptr(), name
    assert meta.counts is not None and meta.counts.data_ptr() == buffers["counts"].data_ptr()
    assert meta.query_tiles is not None and meta.query_tiles.data_ptr() == buffers["query_tiles"].data_ptr()
    assert meta.counts.tolist() == [0, 0, 1, 1] and meta.num_seqs == 0
    assert (buffers["slot_mapping"][:16] == 0).all()  # padding writes only the null block


def test_padding_rows_and_fed_tokens() -> None:
    inputs = _inputs()
    params = SamplingParams(max_tokens=8)
    decode = Request("d", [5, 6, 7], params)
    decode.expect_token(ends_request=False)  # its 4th token is still on the device
    prompt = Request("p", [9] * 20, params)
    chunks = [ScheduledChunk(decode, 3, 1, [1], True), ScheduledChunk(prompt, 0, 20, [2, 3, 4, 5, 6], True)]
    fed = FedTokens(torch.tensor([11, 42]), {"x": 0, "d": 1})
    meta = inputs.load(chunks, lambda c: LaunchShape(32, 8, 1, 3), fed)
    ids = inputs.dev["input_ids"]
    assert ids[0].item() == 42  # taken on the device from the previous step's row of "d"
    assert ids[1:21].tolist() == [9] * 20 and ids[21:32].tolist() == [0] * 11
    assert inputs.dev["slot_mapping"][21:32].tolist() == [0] * 11
    assert meta.num_decode_seqs == 1 and meta.counts is not None and meta.counts.tolist() == [1, 2, 1, 1]
    assert meta.context_free_prefill and inputs.num_fed_rows == 1


def test_a_rank_copy_gives_the_same_views_of_its_own_buffers() -> None:
    """A tensor-parallel rank's graph reads the views of its own copy that match rank 0's views: same
    buffer, shape, strides and offset; and the ids fed from the previous step land in every copy."""
    inputs = _inputs()
    rank = inputs.add_rank(torch.device("cpu"))
    meta = inputs.load_padding(LaunchShape(16, 8, 2, 4))
    mirrored = rank.metadata(meta)
    for name in ("query_start_loc", "seq_lens", "context_lens", "block_tables", "slot_mapping", "counts",
                 "query_tiles"):
        ours, theirs = getattr(meta, name), getattr(mirrored, name)
        assert theirs.untyped_storage().data_ptr() == rank.dev[name].untyped_storage().data_ptr(), name
        assert (theirs.shape, theirs.stride(), theirs.storage_offset()) == (
            ours.shape, ours.stride(), ours.storage_offset()), name
    view = inputs.input_ids[3:9]
    assert rank.view_of(view).storage_offset() == 3 and rank.view_of(view).shape == (6,)
    with pytest.raises(ValueError, match="not a view of a step-input buffer"):
        rank.view_of(torch.zeros(4, dtype=torch.int32))
    rank.feed(torch.tensor([2, 5]), torch.tensor([70, 71], dtype=torch.int32))
    assert rank.dev["input_ids"][[2, 5]].tolist() == [70, 71]


@pytest.mark.parametrize(("splits", "with_split_paths"), [((1, 1), False), ((3, 1), True), ((1, 2), True)])
def test_a_step_that_splits_takes_the_launch_with_the_split_paths(splits: tuple[int, int],
                                                                   with_split_paths: bool) -> None:
    """The split counts the rule chooses go to the device with the step's counts, and only a step that
    splits something gets the launch (graph variant) with the split paths; the counts the rule saw are
    the step's: decodes' and chunks' longest contexts apart."""
    seen = []

    def rule(counts, launch):  # noqa: ANN001, ANN202
        seen.append(counts)
        return np.full(counts.num_decodes, splits[0], dtype=np.int32), splits[1]

    inputs = StepInputs(64, 8, 16, 4, torch.device("cpu"), query_tile_rows=16, kv_splits=rule)
    inputs.split_item_table = True
    params = SamplingParams(max_tokens=8)
    decode, prompt = Request("d", [5, 6, 7], params), Request("p", [9] * 20, params)
    chunks = [ScheduledChunk(decode, 2, 1, [1], True), ScheduledChunk(prompt, 4, 16, [2, 3, 4, 5, 6], True)]
    meta = inputs.load(chunks, lambda c: LaunchShape(32, 8, 8, 3))
    assert meta.counts is not None and meta.counts.tolist() == [1, 1, *splits]
    assert meta.launch is not None and meta.launch.kv_split is with_split_paths
    assert (seen[0].max_decode_seq_len, seen[0].max_chunk_seq_len) == (3, 20)
    assert seen[0].decode_lens().tolist() == [3]
    if with_split_paths:  # the item table the split launch reads: the one decode's splits
        starts, items = inputs.np["decode_item_starts"], inputs.np["decode_item_seq"]
        assert starts[:2].tolist() == [0, splits[0]] and items[:splits[0]].tolist() == [0] * splits[0]
        assert meta.decode_item_starts is not None and meta.decode_item_seq is not None

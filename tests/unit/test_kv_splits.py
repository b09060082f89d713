"""The split rule's room in a CUDA graph: a graph never caps the decode splits its batch sizes want."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.engine.kernels.paged_decode import choose_num_splits
from pdserve.engine.kv_splits import KVSplitRule, graph_launch_shape
from pdserve.engine.step_inputs import StepCounts


@pytest.mark.parametrize(("num_sms", "num_kv_heads", "num_heads"), [(132, 8, 32), (108, 8, 64), (132, 4, 16),
                                                                    (78, 2, 16), (132, 1, 8)])
@pytest.mark.parametrize("context", [256, 1024, 4096, 65536])
def test_a_graph_step_gets_the_decode_splits_its_batch_wants(num_sms: int, num_kv_heads: int, num_heads: int,
                                                              context: int) -> None:
    """Every decode-only batch a graph holds splits as flash-decoding wants for its count and context
    (32 decodes of 4k on an H200: two splits each, which a graph with room for 33 items per KV head cut
    to one), and the items fit the graph's launch."""
    rule = KVSplitRule(num_kv_heads, num_sms, num_heads, balanced=False)
    balanced_rule = KVSplitRule(num_kv_heads, num_sms, num_heads, balanced=True)
    for graph in (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 512):
        launch = graph_launch_shape(graph, 256, 16, num_kv_heads, num_sms)
        for n in range(1, min(graph, 256) + 1):
            decode, prefill = rule(StepCounts(graph, n, 0, context, context, 0), launch)
            assert decode.tolist() == [choose_num_splits(n, num_kv_heads, context, num_sms)] * n, (graph, n)
            assert decode.sum() <= launch.decode_programs and prefill == 1
            balanced, _ = balanced_rule(StepCounts(graph, n, 0, context, context, 0), launch)
            assert balanced.sum() <= launch.decode_programs


def test_room_is_the_capacity_once_no_decode_splits() -> None:
    """A graph of more decodes than fill the GPU twice needs no room beyond one item per decode."""
    assert graph_launch_shape(512, 256, 16, 8, 132).decode_programs == 256
    assert graph_launch_shape(32, 256, 16, 8, 132).decode_programs == 66  # 3 decodes x 22 splits


def test_balanced_splits_give_a_long_decode_among_short_ones_more_splits() -> None:
    """Each decode split by its own context: one long conversation among short ones takes the splits,
    which every decode alike would spread over the short ones too (their items then read nothing)."""
    rule = KVSplitRule(8, 132, 32, balanced=True)
    launch = graph_launch_shape(48, 256, 16, 8, 132)
    lens = np.array([2000] + [100] * 28, dtype=np.int32)
    counts = StepCounts(48, 29, 0, 2000, 2000, 0, decode_seq_lens=lens)
    decode, _ = rule(counts, launch)
    assert decode[0] > 2 and (decode[1:] == 1).all() and decode.sum() <= launch.decode_programs
    alike, _ = KVSplitRule(8, 132, 32, balanced=False)(counts, launch)
    assert alike.tolist() == [2] * 29


def test_balanced_splits_keep_one_count_for_alike_contexts() -> None:
    """Decodes of about one context (each one's own token past a whole tile) keep the one count for all,
    which ran faster on an H200 than the balanced rule's extra split each; ragged ones split by context."""
    rule = KVSplitRule(8, 132, 32, balanced=True)
    launch = graph_launch_shape(640, 256, 16, 8, 132)
    alike = StepCounts(544, 32, 8, 2049, 2049, 1536, decode_seq_lens=np.full(32, 2049, dtype=np.int32))
    assert rule(alike, launch)[0].tolist() == [choose_num_splits(32, 8, 2049, 132)] * 32 == [2] * 32
    lens = np.array([4000] + [700] * 31, dtype=np.int32)  # longest 4.9x the mean
    ragged = StepCounts(544, 32, 8, 4000, 4000, 1536, decode_seq_lens=lens)
    decode = rule(ragged, launch)[0]
    assert decode[0] > decode[1] and len(set(decode[1:].tolist())) == 1

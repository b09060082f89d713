"""Which CUDA graph a step replays: the fastest one that holds it (``fastest_covering``)."""

from __future__ import annotations

from pdserve.engine.cuda_graphs import fastest_covering


def test_a_slow_graph_routes_to_the_faster_larger_one() -> None:
    # replay ms by size 256, 320, 384, 448, 512, 640 (448 got a poor matrix-product kernel)
    times = [6.2, 7.5, 8.6, 13.6, 10.3, 12.5]
    assert fastest_covering(times, margin=0.03) == [0, 1, 2, 4, 4, 5]


def test_monotone_times_keep_every_graph() -> None:
    assert fastest_covering([1.0, 2.0, 3.0, 4.0], margin=0.03) == [0, 1, 2, 3]


def test_within_the_margin_the_smaller_graph_stays() -> None:
    assert fastest_covering([10.0, 9.8, 12.0], margin=0.03) == [0, 1, 2]
    assert fastest_covering([10.0, 9.6, 12.0], margin=0.03) == [1, 1, 2]


def test_the_fastest_of_several_larger_graphs_wins() -> None:
    assert fastest_covering([9.0, 14.0, 11.0, 8.0, 12.0], margin=0.03) == [3, 3, 3, 3, 4]

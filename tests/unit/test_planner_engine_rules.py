"""The planner's simulated workers follow the engine's own scheduling rules, through the same code:
the TTFT deadline order of queued prompts (``common/deadline_order.py``) and the growth of a budget-cut
chunk into its step's CUDA graph padding (``common/graph_sizes.py``); and a profile carries its graph rows."""

from __future__ import annotations

import json

import pytest

from pdserve.common.deadline_order import LATE_PROMOTION_FACTOR, deadline_order
from pdserve.common.errors import ConfigError
from pdserve.common.graph_sizes import capture_sizes, padded_rows
from pdserve.common.step_model import StepTimeModel
from pdserve.planner.plan import Profile
from pdserve.planner.simulate import ClusterSimulation, SimRequest, WorkerSpec

MODEL = StepTimeModel(base_s=2e-3, per_token_s=20e-6, free_tokens=64)


def test_deadline_order_puts_prompts_that_can_still_meet_their_deadline_first() -> None:
    """(arrival, tokens): at 10k tokens/s a 3,000-token prompt that arrived first can no longer meet a
    250 ms deadline at t=0.1; the two short ones behind it can, and go first; one that waited 4 SLOs
    goes before all."""
    prompts = [(0.0, 3000), (0.05, 200), (0.06, 300), (0.1 - LATE_PROMOTION_FACTOR * 0.25 - 0.01, 50)]
    ordered, late = deadline_order(prompts, arrival_s=lambda p: p[0], prompt_tokens=lambda p: p[1], slo_s=0.25,
                                   prefill_tokens_per_s=10_000.0, now=0.1)
    assert ordered == [prompts[3], prompts[1], prompts[2], prompts[0]]
    assert late == [prompts[0]]
    same, none_late = deadline_order(prompts[:3], arrival_s=lambda p: p[0], prompt_tokens=lambda p: p[1],
                                     slo_s=0.25, prefill_tokens_per_s=None, now=0.1)
    assert same == prompts[:3] and none_late == []  # no rate: arrival order, nobody late yet


def test_a_simulated_worker_with_a_ttft_slo_serves_the_prompts_that_can_still_make_it_first() -> None:
    """A busy worker holds a long prompt that cannot meet 250 ms and, behind it, short ones that can: with
    the SLO (the engine's deadline order) the short ones get their first token sooner, the long one later,
    and it is counted late; without it, first come first served."""
    requests = [SimRequest(0.0, 8000, 2), SimRequest(0.0005, 20000, 2), SimRequest(0.001, 200, 2),
                SimRequest(0.0011, 200, 2)]

    def run(ttft_slo_s: float | None) -> tuple[list[float], int]:
        sim = ClusterSimulation(MODEL, colocated=1, colocated_spec=WorkerSpec(max_batch_tokens=4096,
                                                                              ttft_slo_s=ttft_slo_s))
        outcomes = sim.run(requests)
        return [o.ttft_s for o in outcomes], sim.num_late_prompts  # type: ignore[misc]

    fcfs, fcfs_late = run(None)
    ordered, late = run(0.25)
    assert fcfs_late == 0 and late >= 1
    assert ordered[2] < fcfs[2] and ordered[3] < fcfs[3]  # the short prompts overtake the long one
    assert ordered[1] > fcfs[1]
    assert ordered[0] == fcfs[0]  # the first prompt was already being computed: it keeps its place


def test_a_budget_cut_chunk_fills_its_graph_padding_as_the_engine_does() -> None:
    """Decodes running under a 10 ms budget leave room for a few hundred prompt tokens a step; with the
    engine's CUDA graph rows the cut chunk grows to the graph's size, so the prompt needs fewer steps."""
    rows = tuple(capture_sizes(256, 1024))
    assert padded_rows(rows, 300) == 320 and padded_rows(rows, 1024) == 1024 and padded_rows(rows, 1500) == 1500
    assert padded_rows((), 300) == 300
    requests = [SimRequest(0.0, 16, 400), SimRequest(0.01, 4000, 2)]

    def steps(graph_rows: tuple[int, ...]) -> tuple[int, float]:
        spec = WorkerSpec(max_batch_tokens=8192, step_budget_s=0.01, graph_rows=graph_rows)
        outcomes = ClusterSimulation(MODEL, colocated=1, colocated_spec=spec).run(requests)
        return outcomes[1].prompt_steps, outcomes[1].ttft_s  # type: ignore[return-value]

    plain_steps, plain_ttft = steps(())
    filled_steps, filled_ttft = steps(rows)
    assert filled_steps < plain_steps and filled_ttft < plain_ttft


def test_a_profile_carries_its_graph_rows(tmp_path) -> None:  # noqa: ANN001
    """Written by ``pdserve profile`` since it records them; a GPU profile from before gets the engine's
    default graphs, a CPU one none; anything but ascending positive integers is refused."""
    model = MODEL.to_dict()
    assert Profile.from_dict({"model": model, "graph_rows": [16, 32, 64]}).graph_rows == (16, 32, 64)
    assert Profile.from_dict({"model": model, "engine": {"device": "cuda:0"}}).graph_rows == tuple(capture_sizes(256, 1024))
    assert Profile.from_dict({"model": model, "engine": {"device": "cpu"}}).graph_rows == ()
    profile = Profile.from_dict({"model": model, "graph_rows": [8, 512]})
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile.to_dict()))
    assert Profile.load(path).graph_rows == (8, 512)
    for bad in ([64, 32], [0, 16], ["16"], [16, 16], {"a": 1}):
        with pytest.raises(ConfigError, match="graph_rows must be ascending"):
            Profile.from_dict({"model": model, "graph_rows": bad})


def test_a_simulated_step_may_take_the_slack_its_decodes_built_up_as_the_engine_does() -> None:
    """A request decoding at ~2 ms a token under a 15 ms TPOT SLO is ~13 ms a token ahead; when a long
    prompt arrives, the step budget is that slack (the engine's ``StepBudget.seconds``), not the SLO, so
    the prompt takes far fewer steps than chunks cut to 15 ms would need."""
    from pdserve.common.step_model import StepShape

    requests = [SimRequest(0.0, 16, 2000), SimRequest(1.0, 6000, 2)]
    spec = WorkerSpec(max_batch_tokens=8192, step_budget_s=0.015)
    sim = ClusterSimulation(MODEL, colocated=1, colocated_spec=spec)
    outcomes = sim.run(requests)
    at_slo = MODEL.max_chunk_tokens(StepShape.of([500]), 0.015, 6000, 0)
    assert 0 < at_slo < 1000
    assert outcomes[1].prompt_steps < (6000 // at_slo) / 2
    tpot = outcomes[0].tpot_s
    assert tpot is not None and tpot <= 0.015  # the long steps were paid for with the slack

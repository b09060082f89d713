"""The planner's simulation with a KV cache of limited size: blocks on demand, preemption of the newest
decoding request (recomputed later), landing only into free blocks, and requests that cannot fit at all."""

from __future__ import annotations

import json
import random

import pytest

from pdserve.common.errors import ConfigError
from pdserve.engine.step_time import StepTimeModel
from pdserve.planner.plan import Profile, simulation
from pdserve.planner.simulate import ClusterSimulation, SimRequest, WorkerSpec, kv_blocks_tokens

MODEL = StepTimeModel(base_s=0.005, per_token_s=2e-5, free_tokens=64, per_kv_token_s=1e-8, per_pair_s=1e-9)


def _workload(n: int = 60, seed: int = 3) -> list[SimRequest]:
    rng, t, requests = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(20.0)
        requests.append(SimRequest(t, rng.randint(16, 600), rng.randint(2, 120)))
    return requests


def _times(outcomes) -> list[tuple[float | None, float | None]]:  # noqa: ANN001
    return [(o.first_token_s, o.done_s) for o in outcomes]


@pytest.mark.parametrize("counts", [{"colocated": 2}, {"prefill": 1, "decode": 1}])
def test_a_cache_larger_than_the_load_changes_nothing(counts: dict[str, int]) -> None:
    def run(capacity: int | None) -> tuple[list, ClusterSimulation]:
        spec = WorkerSpec(kv_capacity_tokens=capacity)
        sim = ClusterSimulation(MODEL, **counts, colocated_spec=spec, prefill_spec=spec,
                                decode_spec=WorkerSpec(max_batch_tokens=2048, kv_capacity_tokens=capacity))
        return sim.run(_workload()), sim

    unbounded, _ = run(None)
    ample, sim = run(10**9)
    assert _times(ample) == _times(unbounded)
    assert (sim.num_preempted, sim.num_dropped) == (0, 0)


def test_a_full_cache_preempts_the_newest_and_every_request_still_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Six requests at once, room for about three at full length: blocks run out while they decode,
    the newest ones go back to recompute, and the KV held never exceeds the cache."""
    capacity = 3 * kv_blocks_tokens(64 + 200)
    requests = [SimRequest(0.0, 64, 200) for _ in range(6)]
    sim = ClusterSimulation(MODEL, colocated=1, colocated_spec=WorkerSpec(kv_capacity_tokens=capacity))
    finish = ClusterSimulation._finish_step
    held: list[int] = []

    def checked(self, worker, plan, now, hand_off) -> None:  # noqa: ANN001
        finish(self, worker, plan, now, hand_off)
        held.append(worker.kv_used())

    monkeypatch.setattr(ClusterSimulation, "_finish_step", checked)
    outcomes = sim.run(requests)
    assert sim.num_preempted > 0 and sim.num_dropped == 0
    assert max(held) <= capacity and max(held) > capacity - 6 * 16
    assert all(o.done_s is not None for o in outcomes)
    first_done = sorted(outcomes[:3], key=lambda o: o.done_s or 0)[-1].done_s
    assert first_done is not None and all((o.done_s or 0) > first_done for o in outcomes[3:])  # newest waited
    unbounded = ClusterSimulation(MODEL, colocated=1).run(requests)
    assert max(o.done_s or 0 for o in outcomes) > max(o.done_s or 0 for o in unbounded)


def test_kv_that_lands_without_free_blocks_waits_and_its_first_token_with_it() -> None:
    """A decode worker with room for one request at a time: the second's KV arrives while the first
    decodes, and it starts (and shows its first token) only when the first has finished."""
    capacity = kv_blocks_tokens(100 + 50) + 15
    sim = ClusterSimulation(MODEL, prefill=1, decode=1, transfer_s=0.001,
                            decode_spec=WorkerSpec(max_batch_tokens=2048, kv_capacity_tokens=capacity))
    first, second = sim.run([SimRequest(0.0, 100, 50), SimRequest(0.0, 100, 50)])
    assert first.done_s is not None and second.first_token_s is not None
    assert second.first_token_s >= first.done_s
    assert sim.num_preempted == 0 and sim.num_dropped == 0


def test_a_request_larger_than_the_cache_is_dropped_and_the_rest_served() -> None:
    sim = ClusterSimulation(MODEL, colocated=1, colocated_spec=WorkerSpec(kv_capacity_tokens=256))
    big, small = sim.run([SimRequest(0.0, 400, 4), SimRequest(0.01, 64, 4)])
    assert big.ttft_s is None and not big.meets(10.0, 10.0)
    assert small.done_s is not None
    assert sim.num_dropped == 1


def test_profiles_carry_the_kv_capacity_to_every_simulated_worker(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"model": MODEL.to_dict(), "kv_bytes_per_token": 131072, "kv_capacity_tokens": 4096}))
    profile = Profile.load(path)
    assert profile.kv_capacity_tokens == 4096
    assert Profile.from_dict(profile.to_dict()).kv_capacity_tokens == 4096
    for counts in ({"colocated": 2}, {"prefill": 1, "decode": 1}):
        sim = simulation(profile, counts, ttft_slo_s=0.25, tpot_slo_s=0.015)
        assert {w.spec.kv_capacity_tokens for w in sim.workers} == {4096}
    older = {"model": MODEL.to_dict(), "kv_bytes_per_token": 131072}  # written before the field existed
    assert Profile.from_dict(older).kv_capacity_tokens is None
    for bad in (0, -5, 1.5, "4096", True):
        with pytest.raises(ConfigError, match="kv_capacity_tokens"):
            Profile.from_dict({**older, "kv_capacity_tokens": bad})


def test_plan_says_which_configuration_runs_out_of_blocks() -> None:
    """Long requests on two GPUs with room for a few per worker: the single decode worker of 1P1D
    preempts, and the plan's table says so; with room to spare it says nothing."""
    from pdserve.planner.plan import Workload, plan, render

    workload = Workload.poisson(4.0, 512, 256, n=40)
    tight = plan(Profile(MODEL, kv_capacity_tokens=3000), workload, 2, ttft_slo_s=1.0, tpot_slo_s=0.05)
    by_config = {p["config"]: p for p in tight["predictions"]}
    assert by_config["1P1D"]["preemptions_per_request"] > 0
    assert "KV cache short at the offered rate: " in render(tight) and "1P1D preempts" in render(tight)
    ample = plan(Profile(MODEL, kv_capacity_tokens=10**8), workload, 2, ttft_slo_s=1.0, tpot_slo_s=0.05)
    assert all(p["preemptions_per_request"] == 0 == p["dropped_share"] for p in ample["predictions"])
    assert "KV cache short" not in render(ample)

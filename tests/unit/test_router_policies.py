"""Routing policies on synthetic worker states: filter -> score in [0, 1] -> pick, round-robin ties."""

from __future__ import annotations

import pytest

from pdserve.router import (
    DecodePolicyConfig,
    LeastLoadedDecodePolicy,
    LeastQueuedPrefillPolicy,
    LoadSnapshot,
    WorkerEndpoint,
    WorkerState,
)
from pdserve.router.errors import NoWorkerAvailableError
from pdserve.router.prefill_policy import PrefillPolicy, estimate_prompt_tokens


def _worker(worker_id: str, role: str = "decode", *, kv: float = 0.0, running: int = 0, waiting: int = 0,
            assigned: int = 0, queued: int = 0, healthy: bool = True, stream: bool = True) -> WorkerState:
    return WorkerState(endpoint=WorkerEndpoint(worker_id, role, f"10.0.0.{len(worker_id)}:7000"),  # type: ignore[arg-type]
                       healthy=healthy, stream_live=stream,
                       load=LoadSnapshot(running_requests=running, waiting_requests=waiting, kv_usage=kv),
                       assigned_requests=assigned, queued_prefill_tokens=queued)


def test_decode_policy_prefers_low_kv_usage_and_few_requests() -> None:
    policy = LeastLoadedDecodePolicy()
    workers = [_worker("a", kv=0.8, running=2), _worker("b", kv=0.2, running=2), _worker("c", kv=0.2, running=6)]
    assert policy.pick(workers).worker_id == "b"
    scores = policy.score(workers)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[1] > scores[0] and scores[1] > scores[2]


def test_decode_policy_weights() -> None:
    workers = [_worker("a", kv=0.9, running=1), _worker("b", kv=0.1, running=8)]
    kv_only = LeastLoadedDecodePolicy(DecodePolicyConfig(kv_usage_weight=1.0, running_requests_weight=0.0))
    requests_only = LeastLoadedDecodePolicy(DecodePolicyConfig(kv_usage_weight=0.0, running_requests_weight=1.0))
    assert kv_only.pick(workers).worker_id == "b"
    assert requests_only.pick(workers).worker_id == "a"


def test_decode_policy_counts_assignments_not_yet_in_the_load() -> None:
    policy = LeastLoadedDecodePolicy()
    # The load reports are stale: "a" was just given 5 requests the worker has not reported yet.
    workers = [_worker("a", running=1, assigned=5), _worker("b", running=3, waiting=1)]
    assert LeastLoadedDecodePolicy.num_requests(workers[0]) == 5
    assert LeastLoadedDecodePolicy.num_requests(workers[1]) == 4
    assert policy.pick(workers).worker_id == "b"


def test_ties_are_broken_round_robin() -> None:
    policy = LeastLoadedDecodePolicy()
    workers = [_worker("a"), _worker("b"), _worker("c")]
    assert [policy.pick(workers).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_unhealthy_and_streamless_workers_are_filtered_out() -> None:
    policy = LeastLoadedDecodePolicy()
    workers = [_worker("a", healthy=False), _worker("b", stream=False), _worker("c", kv=0.99, running=50)]
    assert policy.pick(workers).worker_id == "c"
    with pytest.raises(NoWorkerAvailableError) as info:
        policy.pick(workers, exclude={"c"})
    message = str(info.value)
    assert "no healthy decode worker" in message
    assert "a at" in message and "unhealthy" in message
    assert "b at" in message and "Updates stream is down" in message
    assert "c at" in message and "failed this request already" in message


def test_no_worker_configured() -> None:
    with pytest.raises(NoWorkerAvailableError, match="no prefill worker is configured"):
        LeastQueuedPrefillPolicy().pick([])


def test_prefill_policy_picks_the_least_queued_worker() -> None:
    policy = LeastQueuedPrefillPolicy()
    workers = [_worker("p0", "prefill", queued=500), _worker("p1", "prefill", queued=20),
               _worker("p2", "prefill", queued=300)]
    assert policy.pick(workers).worker_id == "p1"
    assert policy.score(workers) == pytest.approx([0.0, 0.96, 0.4])
    # Prefill workers have no Updates stream: healthy is enough.
    assert policy.pick([_worker("p3", "prefill", stream=False)]).worker_id == "p3"
    assert policy.pick([_worker("p4", "prefill", healthy=False), _worker("p5", "prefill", queued=9)]).worker_id == "p5"


def test_short_prompt_hook() -> None:
    assert PrefillPolicy.should_prefill_remotely(LeastQueuedPrefillPolicy(), 1)
    assert LeastQueuedPrefillPolicy().should_prefill_remotely(1), "default: always remote"
    hook = LeastQueuedPrefillPolicy(min_remote_prompt_tokens=64)
    assert not hook.should_prefill_remotely(63)
    assert hook.should_prefill_remotely(64)


def test_overflow_is_prefilled_locally_only_while_every_prefill_worker_is_backed_up() -> None:
    hook = LeastQueuedPrefillPolicy(max_queued_prefill_tokens=1000)
    busy, idle = _worker("p0", "prefill", queued=1000), _worker("p1", "prefill", queued=999)
    assert hook.should_prefill_remotely(4000, [busy, idle])
    assert not hook.should_prefill_remotely(4000, [busy, _worker("p2", "prefill", queued=5000)])
    assert hook.should_prefill_remotely(4000, []), "no prefill worker to judge: the pick reports it"
    assert LeastQueuedPrefillPolicy().should_prefill_remotely(10, [busy]), "0: never overflow"
    with pytest.raises(ValueError, match="max_queued_prefill_tokens"):
        LeastQueuedPrefillPolicy(max_queued_prefill_tokens=-1)


def test_prompt_token_estimate() -> None:
    assert estimate_prompt_tokens(num_token_ids=7, text=None) == 7
    assert estimate_prompt_tokens(num_token_ids=None, text="x" * 9) == 3
    assert estimate_prompt_tokens(num_token_ids=None, text="") == 1


def _rated(worker: WorkerState, *, full_rate: float = 0.0, spare_rate: float = 0.0,
           reported_queue: int = 0) -> WorkerState:
    from pdserve.v1 import worker_pb2

    worker.info = worker_pb2.WorkerInfo(worker_id=worker.worker_id, prefill_tokens_per_s=full_rate)
    worker.load = LoadSnapshot(queued_prefill_tokens=reported_queue, prefill_tokens_per_s=spare_rate)
    return worker


def test_ttft_aware_placement_keeps_a_prompt_local_only_when_the_pool_would_be_late() -> None:
    policy = LeastQueuedPrefillPolicy(ttft_slo_s=0.25)
    decode = _rated(_worker("d"), spare_rate=2_000.0)  # 1k-token prompt locally: 0.5 s
    idle = _rated(_worker("p", "prefill"), full_rate=40_000.0)
    assert policy.should_prefill_remotely(1000, [idle], decode)  # 25 ms in the pool
    backed_up = _rated(_worker("p", "prefill", queued=16_000), full_rate=40_000.0)  # 0.425 s
    assert policy.should_prefill_remotely(1000, [backed_up], decode)  # late, but still faster than local
    fast_decode = _rated(_worker("d"), spare_rate=10_000.0)  # 0.1 s locally
    assert not policy.should_prefill_remotely(1000, [backed_up], fast_decode)
    assert policy.num_spilled == 1
    # the decode worker's own queue counts, whichever of its report and the router's charge is larger
    busy_decode = _rated(_worker("d", queued=5000), spare_rate=10_000.0)
    assert policy.should_prefill_remotely(1000, [backed_up], busy_decode)
    busy_report = _rated(_worker("d"), spare_rate=10_000.0, reported_queue=5000)
    assert policy.should_prefill_remotely(1000, [backed_up], busy_report)


def test_a_spilled_prompt_goes_to_the_decode_worker_that_would_finish_it_soonest() -> None:
    """Of the eligible decode workers, the one whose spare rate and queue finish the prompt first is weighed
    against the prefill pool (and takes the prompt when it stays local); the decode policy's pick otherwise."""
    policy = LeastQueuedPrefillPolicy(min_remote_prompt_tokens=256, ttft_slo_s=0.25)
    picked = _rated(_worker("d1"), spare_rate=2_000.0)  # 0.5 s for 1k tokens
    spare = _rated(_worker("d2"), spare_rate=20_000.0)  # 0.05 s
    queued = _rated(_worker("d3", queued=19_000), spare_rate=20_000.0)  # 1.0 s behind its queue
    everyone = [picked, spare, queued]
    backed_up = _rated(_worker("p", "prefill", queued=16_000), full_rate=40_000.0)  # 0.425 s in the pool
    assert policy.local_prefill_worker(1000, [backed_up], picked, everyone) is spare  # d2 beats the pool
    assert policy.should_prefill_remotely(1000, [backed_up], picked)  # d1 alone would have sent it to the pool
    assert policy.local_prefill_worker(1000, [backed_up], picked, [picked, queued]) is None  # none beats it
    idle = _rated(_worker("p", "prefill"), full_rate=40_000.0)
    assert policy.local_prefill_worker(1000, [idle], picked, everyone) is None  # the pool is in time
    # a short prompt stays local for its length, on the decode policy's pick (its affinity, its KV room)
    assert policy.local_prefill_worker(100, [backed_up], picked, everyone) is picked
    # without an SLO, the queue-length rule keeps the pick too
    by_queue = LeastQueuedPrefillPolicy(max_queued_prefill_tokens=1000)
    assert by_queue.local_prefill_worker(1000, [backed_up], picked, everyone) is picked


def test_ttft_aware_placement_falls_back_without_rates() -> None:
    policy = LeastQueuedPrefillPolicy(max_queued_prefill_tokens=1000, ttft_slo_s=0.25)
    unknown = _worker("p", "prefill", queued=2000)  # no Describe rate: the queue-length rule applies
    assert not policy.should_prefill_remotely(100, [unknown], _worker("d"))
    assert policy.should_prefill_remotely(100, [_worker("p", "prefill", queued=10)], _worker("d"))

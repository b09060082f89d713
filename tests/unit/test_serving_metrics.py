"""The serving benchmark's definitions: TPOT, ITL, SLO attainment, goodput, arrival schedules, trace replay."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks.serving.metrics import RequestRecord, attainment, goodput, summarize
from benchmarks.serving.workload import (
    RequestSpec,
    poisson_schedule,
    sharegpt_workload,
    trace_workload,
)
from pdserve.common.mooncake_trace import TRACE_BLOCK_TOKENS, TraceArrivals


def _record(sent: float, times: list[float], error: str | None = None) -> RequestRecord:
    return RequestRecord(0, scheduled_s=sent, sent_s=sent, token_times=times, error=error)


def test_tpot_excludes_the_first_token_and_itl_counts_every_gap() -> None:
    r = _record(1.0, [1.5, 1.6, 1.6, 1.9])  # TTFT 0.5; then 3 tokens over 0.4 s (two arrived together)
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.4 / 3)
    assert r.itls == pytest.approx([0.1, 0.0, 0.3])
    assert r.e2e == pytest.approx(0.9)
    assert _record(0.0, [0.2]).tpot is None


def test_slo_attainment_needs_every_slo_and_success() -> None:
    good = _record(0.0, [0.1, 0.11, 0.12])
    slow_first = _record(0.0, [0.4, 0.41, 0.42])
    slow_tokens = _record(0.0, [0.1, 0.2, 0.3])
    failed = _record(0.0, [0.1, 0.11], error="UNAVAILABLE")
    one_token = _record(0.0, [0.2])
    records = [good, slow_first, slow_tokens, failed, one_token]
    assert [r.meets(0.25, 0.02) for r in records] == [True, False, False, False, True]
    assert attainment(records, 0.25, 0.02) == pytest.approx(2 / 5)
    summary = summarize(records, 1.0, [(0.25, 0.02)])
    assert summary["errors"] == 1 and summary["slo_attainment"]["ttft<=250ms,tpot<=20ms"] == pytest.approx(0.4)


def test_summary_tallies_error_messages_and_says_how_steady_the_load_was() -> None:
    lost = "request {} failed on worker decode-1: moved 2 time(s)"
    records = [RequestRecord(i, scheduled_s=i * 0.5, sent_s=i * 0.5, token_times=[i * 0.5 + 0.1, i * 0.5 + 1.0],
                             error=lost.format(f"r{i}") if i % 3 == 0 else None) for i in range(9)]
    records.append(_record(0.0, [], error="DEADLINE_EXCEEDED after 600 s"))
    summary = summarize(records, 5.0, [(0.25, 0.02)])
    assert summary["error_kinds"] == {"request <id> failed on worker decode-N: moved N time(s)": 3,
                                      "DEADLINE_EXCEEDED after N s": 1}
    # arrivals over 4 s, each successful request lives 1 s: four lifetimes
    assert summary["arrivals_over_e2e"] == pytest.approx(4.0)
    assert summarize([_record(0.0, [0.1])], 1.0, [])["arrivals_over_e2e"] is None


def test_goodput_is_the_highest_rate_meeting_90_percent() -> None:
    assert goodput([(1, 1.0), (2, 0.95), (4, 0.5)]) == pytest.approx(2 + 2 * (0.05 / 0.45))
    assert goodput([(1, 0.95), (2, 0.93)]) == 2
    assert goodput([(1, 0.5), (2, 0.4)]) == 0.0


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_poisson_schedule_has_the_right_mean_and_span(burstiness: float) -> None:
    rate, n = 8.0, 20000
    offsets = poisson_schedule(n, rate, seed=3, burstiness=burstiness)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert offsets[-1] == pytest.approx((n - 1) / rate, rel=0.05)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)  # gamma: cv = 1/sqrt(shape)
    assert cv == pytest.approx(burstiness**-0.5, rel=0.1)


def test_trace_replay_reproduces_prefix_sharing(tmp_path) -> None:
    rows = [
        {"timestamp": 0, "input_length": 1200, "output_length": 10, "hash_ids": [1, 2, 3]},
        {"timestamp": 500, "input_length": 1500, "output_length": 5, "hash_ids": [1, 2, 4]},
        {"timestamp": 2000, "input_length": 600, "output_length": 7, "hash_ids": [9, 2]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = trace_workload(path, time_scale=0.5, length_scale=0.5, arrivals=TraceArrivals.RECORDED)
    block = TRACE_BLOCK_TOKENS // 2
    assert [len(s.prompt_token_ids) for s in specs] == [600, 750, 300]
    assert [s.output_len for s in specs] == [5, 2, 4]
    assert [s.arrival_s for s in specs] == [0.0, 0.25, 1.0]
    a, b, c = (s.prompt_token_ids for s in specs)
    assert a[: 2 * block] == b[: 2 * block]  # hash ids 1, 2 shared at the same positions
    assert a[2 * block: 3 * block] != b[2 * block: 3 * block]  # 3 vs 4
    assert c[:block] != a[:block] and c[block:] == a[block:len(c)]  # id 2 at position 1 in both: same tokens
    # a later point of the serving benchmark (salt 1): no token shared with the first pass, the same sharing
    a1, b1, c1 = (s.prompt_token_ids for s in trace_workload(path, time_scale=0.5, length_scale=0.5,
                                                               arrivals=TraceArrivals.RECORDED, salt=1))
    assert a1[:block] != a[:block] and b1[:block] != b[:block] and c1[:block] != c[:block]
    assert a1[: 2 * block] == b1[: 2 * block] and c1[block:] == a1[block:len(c1)]


def test_trace_replay_fills_a_prompt_its_hash_ids_do_not_cover(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "trace.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 700, "output_length": 3, "hash_ids": [5]}) + "\n"
                    + json.dumps({"timestamp": 10, "input_length": 300, "output_length": 3}) + "\n")
    a, b = trace_workload(path)
    assert len(a.prompt_token_ids) == 700 and len(b.prompt_token_ids) == 300


def test_sharegpt_mix_is_deterministic_and_clipped() -> None:
    a, b = sharegpt_workload(200, seed=5), sharegpt_workload(200, seed=5)
    assert [s.output_len for s in a] == [s.output_len for s in b]
    assert all(4 <= len(s.prompt_token_ids) <= 2048 and 4 <= s.output_len <= 1024 for s in a)
    assert 100 < statistics.median(len(s.prompt_token_ids) for s in a) < 300


def test_client_keeps_its_schedule_without_a_server() -> None:
    import asyncio

    from benchmarks.serving.loadgen import client_capacity

    result = asyncio.run(client_capacity(rate=200.0, n=200, output_len=8))
    assert result["p99_lag_s"] < 0.05


def test_a_shard_of_a_schedule_keeps_global_indices_and_the_common_start() -> None:
    import asyncio
    import time

    from benchmarks.serving.loadgen import run_schedule

    seen: list[int] = []

    async def stream(i: int, spec: RequestSpec):  # noqa: ANN202 (an async generator)
        seen.append(i)
        for _ in range(spec.output_len):
            yield 1

    specs = [RequestSpec([1, 2], 3), RequestSpec([1, 2, 3], 2)]
    start_at = time.time() + 0.2
    records, duration, wall_start = asyncio.run(run_schedule(stream, specs, [0.0, 0.05], progress=False,
                                                             indices=[4, 9], start_at=start_at))
    assert wall_start == start_at
    assert [r.index for r in records] == [4, 9] and sorted(seen) == [4, 9]
    assert [r.num_prompt_tokens for r in records] == [2, 3] and [len(r.token_times) for r in records] == [3, 2]
    assert records[0].sent_s >= 0.0 and records[1].sent_s >= 0.05  # times count from the common start
    assert duration < 0.2  # ... which was 0.2 s after the call: the wait is not part of the run


def test_a_record_reads_back_what_it_wrote_and_the_apply_run_scores_phases() -> None:
    import argparse

    from benchmarks.planner_apply import score

    records = [RequestRecord(index=i, scheduled_s=float(i), sent_s=float(i), num_prompt_tokens=8,
                             token_times=[i + 0.1, i + 0.2, i + (0.3 if i < 2 else 2.0)]) for i in range(4)]
    assert [RequestRecord.from_dict(r.to_dict()) for r in records] == records
    timeline = [{"t_s": 1.0, "config": "1P1D"}, {"t_s": 2.0, "config": "0P2D"}, {"t_s": 3.0, "config": "0P2D"}]
    args = argparse.Namespace(phase_s=2.0, num_gpus=2)
    scores = score({"records": [r.to_dict() for r in records], "timeline": timeline}, 2, args, [(0.5, 0.2)])
    assert scores["decode-heavy @ tpot<=200ms"] == {"attainment": 1.0, "good_per_gpu_s": 0.5}
    assert scores["prefill-heavy @ tpot<=200ms"]["attainment"] == 0.0  # their last tokens came 1.8 s late
    assert scores["whole run @ tpot<=200ms"] == {"attainment": 0.5, "good_per_gpu_s": 0.25}
    assert scores["switches"] == [(2.0, "0P2D")]


def test_a_run_records_the_engines_switches_but_never_a_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    """A result measured with an A/B switch says so in its header; credentials never reach a result file."""
    from benchmarks.common import run_info
    from benchmarks.serving.report import render

    monkeypatch.setenv("PDSERVE_FILL_GRAPH_PADDING", "0")
    monkeypatch.setenv("PDSERVE_API_KEYS", "secret-key")
    info = run_info()
    assert info["switches"]["PDSERVE_FILL_GRAPH_PADDING"] == "0"
    assert "PDSERVE_API_KEYS" not in info["switches"] and "secret-key" not in str(info)
    payload = {"settings": {}, "goodput": [], "results": {}, "client_capacity": {}}
    assert "PDSERVE_FILL_GRAPH_PADDING=0" in render(info, payload).splitlines()[2]

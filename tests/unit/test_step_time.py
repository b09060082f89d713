"""The step-time model: fitting, the budget arithmetic the scheduler relies on, profiles, the live check."""

from __future__ import annotations

import json
import random

import pytest

from pdserve.common.errors import ConfigError
from pdserve.engine.step_time import (
    StepKind,
    StepShape,
    StepTimeModel,
    StepTimeMonitor,
    fit_step_time,
    profile_step_time,
)

# H200-like, Llama-3.1-8B: a later chunk's pairs cost twice a fresh prompt's (the paged attention
# kernel at ~300 TFLOP/s against the dense one at ~600; 0.5 MFLOP per pair over 32 layers)
TRUE = StepTimeModel(base_s=4e-3, per_token_s=25e-6, free_tokens=128, per_kv_token_s=2e-8, per_pair_s=0.9e-9,
                     per_context_pair_s=1.8e-9)


def _shape(decodes: int, context: int, chunk: int, chunk_context: int = 0, prompts: int = 1) -> StepShape:
    shape = StepShape(0)
    for _ in range(decodes):
        shape = shape.plus_decode(context)
    for _ in range(prompts):
        shape = shape.plus_chunk(chunk, chunk_context)
    return shape


def _grid() -> list[StepShape]:
    shapes = [_shape(0, 0, c) for c in (16, 64, 256, 1024, 2048, 4096)]
    shapes += [_shape(d, ctx, 0) for d in (1, 16, 64, 128) for ctx in (128, 1024, 4096)]
    shapes += [_shape(64, 128, c) for c in (64, 256)]
    shapes += [_shape(0, 0, c, x) for c, x in ((256, 1024), (256, 4096), (1024, 3072))]
    shapes += [_shape(64, 1024, c, x) for c, x in ((256, 1024), (512, 2048))]
    return shapes


def test_fit_recovers_a_known_model_from_noisy_samples() -> None:
    rng = random.Random(0)
    samples = [(s, TRUE.predict(s) * (1 + rng.uniform(-0.02, 0.02))) for s in _grid()]
    model = fit_step_time(samples)
    for shape, _ in samples:
        assert model.predict(shape) == pytest.approx(TRUE.predict(shape), rel=0.06)
    assert model.free_tokens in (64, 128, 256)
    # the later chunk of a long prompt is priced by its own pairs, not a fresh prompt's
    late_chunk = _shape(0, 0, 512, 6000)
    assert model.predict(late_chunk) == pytest.approx(TRUE.predict(late_chunk), rel=0.08)


def test_a_fit_without_later_chunks_underprices_them() -> None:
    """Why the grid has later chunks: fitted on fresh prompts only, one pair price cannot know that a
    later chunk's pairs cost more (what made a chunking worker's steps run long on an H200)."""
    fresh_only = [s for s in _grid() if s.context_pairs == 0]
    model = fit_step_time([(s, TRUE.predict(s)) for s in fresh_only])
    late_chunk = _shape(0, 0, 512, 6000)
    assert model.predict(late_chunk) < 0.85 * TRUE.predict(late_chunk)


def test_steps_of_many_short_prompts_pin_the_per_token_price() -> None:
    """Why the grid has steps of many short prompts: fitted on one prompt per step, whose pairs grow with
    its tokens, a few percent of measurement noise can trade the per-token price for the per-pair one and
    misprice a large step of short prompts (the prefill worker's step under a burst); with those samples
    the error halves (mean over 20 noisy profiles)."""
    from pdserve.engine.step_time import MANY_PROMPTS

    true = StepTimeModel(base_s=4e-3, per_token_s=20e-6, free_tokens=128, per_kv_token_s=2e-8, per_pair_s=0.9e-9,
                         per_context_pair_s=1.8e-9)
    single = [_shape(0, 0, c) for c in (16, 64, 256, 1024, 2048, 4096, 8192)]
    many = [_shape(0, 0, c, 0, k) for c, k in MANY_PROMPTS]
    burst = _shape(0, 0, 160, 0, 51)  # 8,160 tokens of ~160-token prompts
    errors: dict[bool, float] = {False: 0.0, True: 0.0}
    for seed in range(20):
        rng = random.Random(seed)
        samples = [(s, true.predict(s) * (1 + rng.uniform(-0.05, 0.05))) for s in single + _grid()[6:] + many]
        for with_many in (False, True):
            used = samples if with_many else samples[:-len(many)]
            errors[with_many] += abs(fit_step_time(used).predict(burst) / true.predict(burst) - 1) / 20
    assert errors[True] < 0.6 * errors[False]


def test_max_chunk_tokens_is_the_largest_chunk_within_the_budget() -> None:
    decodes = StepShape(0)
    for _ in range(32):
        decodes = decodes.plus_decode(1000)
    budget = 10e-3
    n = TRUE.max_chunk_tokens(decodes, budget, limit=8192)
    assert TRUE.predict(decodes.plus_chunk(n, 0)) <= budget < TRUE.predict(decodes.plus_chunk(n + 1, 0))
    assert TRUE.max_chunk_tokens(decodes, budget, limit=10) == 10
    assert TRUE.max_chunk_tokens(decodes, 1e-3, limit=8192) == 0  # the decodes alone exceed it
    # a later chunk of the same prompt (more context to attend to) gets fewer tokens
    assert TRUE.max_chunk_tokens(decodes, budget, 8192, chunk_context=20000) < n


def test_profile_round_trip_and_bad_profiles(tmp_path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"model": TRUE.to_dict(), "device": "test"}))
    assert StepTimeModel.load(path) == TRUE
    older = {k: v for k, v in TRUE.to_dict().items() if k != "per_context_pair_s"}  # before the split
    path.write_text(json.dumps(older))
    assert StepTimeModel.load(path).per_context_pair_s == TRUE.per_pair_s
    path.write_text(json.dumps({"base_s": 1.0}))
    with pytest.raises(ConfigError, match="per_token_s"):
        StepTimeModel.load(path)
    path.write_text(json.dumps({**TRUE.to_dict(), "per_token_s": -1}))
    with pytest.raises(ConfigError, match=">= 0"):
        StepTimeModel.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        StepTimeModel.load(tmp_path / "missing.json")


def test_profile_step_time_times_a_grid_inside_the_limits() -> None:
    calls: list[tuple[int, int, int, int, int]] = []

    def run(decodes: int, context: int, chunk: int, chunk_context: int, prompts: int) -> float:
        calls.append((decodes, context, chunk, chunk_context, prompts))
        return TRUE.predict(_shape(decodes, context, chunk, chunk_context, prompts))

    model, rows = profile_step_time(run, max_tokens=2048, max_decodes=16, max_context=2000, kv_capacity_tokens=100000)
    assert all(c * k + d <= 2048 and d <= 16 and k <= 16 and ctx < 2000 and x + c <= 2000
               and d * (ctx + 1) + (c + x) * k <= 50000 for d, ctx, c, x, k in calls)
    assert any(x > 0 and d == 0 for d, _, _, x, _ in calls) and any(x > 0 and d > 0 for d, _, _, x, _ in calls)
    assert (128, 16) in {(c, k) for _, _, c, _, k in calls}  # a step of many short prompts
    assert not any(k > 16 for *_, k in calls)  # 32 prompts would pass the batch size
    assert all(r["predicted"] == pytest.approx(r["seconds"], rel=0.1) for r in rows)
    assert model.prefill_tokens_per_s(512) > 0


def test_run_ratio_weighs_the_whole_run_while_the_calibration_follows_the_last_steps() -> None:
    monitor = StepTimeMonitor(TRUE, window=8, recalibrate_every=8)
    decode = StepShape(0).plus_decode(1000)
    for factor in [1.2] * 48 + [1.5] * 16:  # the load changed near the end
        monitor.record(decode, TRUE.predict(decode) * factor)
    assert monitor.calibration(StepKind.DECODE) == pytest.approx(1.5)
    steps, ratio = monitor.run_ratios()[StepKind.DECODE]
    assert steps == 64 and ratio == pytest.approx((48 * 1.2 + 16 * 1.5) / 64)


def test_time_ratio_weighs_each_step_by_its_length() -> None:
    """Many short steps 30% slower than the model and a few long ones on time: per step the run reads 1.3x
    slow, in busy time barely slower (what a simulation of the run needs)."""
    monitor = StepTimeMonitor(TRUE)
    short, long = StepShape(0).plus_chunk(16, 0), StepShape(0).plus_chunk(8192, 0)
    for _ in range(30):
        monitor.record(short, TRUE.predict(short) * 1.3)
    for _ in range(3):
        monitor.record(long, TRUE.predict(long))
    busy = 30 * TRUE.predict(short) * 1.3 + 3 * TRUE.predict(long)
    assert monitor.time_ratios()[StepKind.PREFILL] == pytest.approx(busy / (30 * TRUE.predict(short)
                                                                          + 3 * TRUE.predict(long)))
    assert monitor.run_ratios()[StepKind.PREFILL][1] > 1.25 > monitor.time_ratios()[StepKind.PREFILL]
    assert monitor.summary()["time_ratio"] == {"prefill": round(monitor.time_ratios()[StepKind.PREFILL], 3)}


def test_recent_busy_time_follows_the_last_steps_without_a_dead_band() -> None:
    """The planner's calibration: the last ``busy_window`` steps of a kind, in seconds, measured against the
    start-up model (not the calibrated one), and a 3% bias the scheduler's 5% dead band ignores shows."""
    monitor = StepTimeMonitor(TRUE, busy_window=10, recalibrate_every=8)
    decode, chunk = StepShape(0).plus_decode(1000), StepShape(0).plus_chunk(512, 0)
    for factor in [2.0] * 20 + [1.03] * 10:  # the old load leaves the window
        monitor.record(decode, TRUE.predict(decode) * factor)
    monitor.record(chunk, TRUE.predict(chunk) * 1.5)
    busy = monitor.recent_busy()
    assert set(busy) == {StepKind.DECODE, StepKind.PREFILL}
    assert busy[StepKind.DECODE].steps == 10
    assert busy[StepKind.DECODE].measured_s / busy[StepKind.DECODE].profiled_s == pytest.approx(1.03)
    assert busy[StepKind.DECODE].profiled_s == pytest.approx(10 * TRUE.predict(decode))
    assert monitor.calibration(StepKind.DECODE) != pytest.approx(1.03)  # the scheduler's factor lags or rounds
    assert busy[StepKind.PREFILL] == (1, pytest.approx(1.5 * TRUE.predict(chunk)), pytest.approx(TRUE.predict(chunk)))


def test_monitor_reports_the_model_error() -> None:
    monitor = StepTimeMonitor(TRUE)
    assert monitor.summary()["steps"] == 0
    for n in (16, 256, 1024):
        shape = StepShape(n)
        monitor.record(shape, TRUE.predict(shape) * 1.25)  # the device is 25% slower than predicted
    summary = monitor.summary()
    assert summary["steps"] == 3 and summary["bias_p50"] == pytest.approx(-0.2, abs=1e-3)


def test_monitor_recalibrates_the_model_to_the_live_steps() -> None:
    monitor = StepTimeMonitor(TRUE, recalibrate_every=8)
    shapes = [StepShape(n, 64 * n) for n in (1, 16, 256, 1024)] * 4
    changed = [monitor.record(s, TRUE.predict(s) * 1.25) for s in shapes]
    assert changed.count(True) == 1 and changed[7]  # after 8 steps, once
    assert monitor.calibration(StepKind.DECODE) == pytest.approx(1.25)
    for s in shapes:
        assert monitor.model.predict(s) == pytest.approx(TRUE.predict(s) * 1.25)
    assert not any(monitor.record(s, monitor.model.predict(s) * 1.02) for s in shapes)  # within tolerance


def test_each_kind_of_step_is_calibrated_on_its_own() -> None:
    # mixed steps run 1.9x the model on the device, decode steps as predicted: decode steps must keep
    # their prediction (one shared factor made the decode worker think its decodes took twice as long)
    monitor = StepTimeMonitor(TRUE, recalibrate_every=8)
    decode = StepShape(0).plus_decode(1000).plus_decode(2000)
    mixed = decode.plus_chunk(300, 0)
    chunked = decode.plus_chunk(300, 0).plus_chunk(400, 1200)  # a later chunk of a prompt: its own kind
    prefill = StepShape(0).plus_chunk(2048, 0)
    assert (decode.kind, mixed.kind, chunked.kind, prefill.kind) == (
        StepKind.DECODE, StepKind.MIXED, StepKind.CHUNKED, StepKind.PREFILL)
    assert StepShape(0).plus_chunk(400, 1200).kind is StepKind.PREFILL  # no decode: a prefill step
    for _ in range(16):
        monitor.record(decode, TRUE.predict(decode))
        monitor.record(mixed, TRUE.predict(mixed) * 1.9)
        monitor.record(chunked, TRUE.predict(chunked) * 1.25)
        monitor.record(prefill, TRUE.predict(prefill) * 0.8)
    assert monitor.model.predict(decode) == pytest.approx(TRUE.predict(decode))
    assert monitor.model.predict(mixed) == pytest.approx(TRUE.predict(mixed) * 1.9)
    assert monitor.model.predict(chunked) == pytest.approx(TRUE.predict(chunked) * 1.25)
    assert monitor.model.predict(prefill) == pytest.approx(TRUE.predict(prefill) * 0.8)
    assert monitor.summary()["calibration"] == {"decode": 1.0, "mixed": 1.9, "chunked": 1.25, "prefill": 0.8}
    assert monitor.summary()["run_ratio"] == {"decode": [16, 1.0], "mixed": [16, 1.9], "chunked": [16, 1.25],
                                              "prefill": [16, 0.8]}
    assert monitor.summary()["time_ratio"] == {"decode": 1.0, "mixed": 1.9, "chunked": 1.25, "prefill": 0.8}
    assert StepTimeModel.from_dict(monitor.model.to_dict()) == TRUE  # a profile holds no calibration


def test_the_first_calibration_comes_early_the_later_ones_every_window() -> None:
    """A kind of step is first calibrated after ``first_after`` of its steps (a worker's budgets and the
    router's planner get live factors within seconds), then every ``recalibrate_every``."""
    monitor = StepTimeMonitor(TRUE, recalibrate_every=20, first_after=4)
    shape = StepShape(0).plus_decode(500)
    changed = [monitor.record(shape, TRUE.predict(shape) * 1.5) for _ in range(4)]
    assert changed == [False, False, False, True] and monitor.calibration(StepKind.DECODE) == pytest.approx(1.5)
    slower = [monitor.record(shape, TRUE.predict(shape) * 2.0) for _ in range(20)]
    assert slower.index(True) == 19 and monitor.calibration(StepKind.DECODE) == pytest.approx(2.0)


def test_an_engine_profiles_steps_of_many_prompts_and_gives_every_block_back() -> None:
    """The start-up profile through a real engine (tiny model, CPU): steps of many short fresh prompts
    among its samples, and the KV cache whole again afterwards (synthetic requests are not work)."""
    from pdserve import EngineConfig
    from pdserve.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny-random", step_time_budget_ms=15.0, max_num_batched_tokens=2048,
                                    max_model_len=2304))
    many = [r for r in engine.step_time_samples if r["prompts"] > 1]
    assert {(r["chunk_tokens"], r["prompts"]) for r in many} >= {(128, 16)}
    assert all(r["seconds"] > 0 for r in many)
    assert engine.kv.num_free_blocks == engine.kv.pool.num_usable_blocks

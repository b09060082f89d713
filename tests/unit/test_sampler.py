"""Unit tests for pdserve.engine.sampler: greedy, filters, distribution, penalties, min_tokens, seeds, logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.sampler import Sampler, SamplingRow, _apply_filters, _apply_penalties

CPU = torch.device("cpu")
EOS = 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(n: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=_gen(seed)) * scale


def _row(
    params: SamplingParams,
    request_id: str = "r",
    prompt: Sequence[int] = (1, 2),
    output: Sequence[int] = (),
    eos: tuple[int, ...] = (EOS,),
) -> SamplingRow:
    return SamplingRow(request_id, params, tuple(prompt), tuple(output), eos)


# --------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = _logits(16, 100, seed=1).to(dtype)
    before = logits.clone()
    rows = [_row(SamplingParams(temperature=0.0, top_k=5, top_p=0.3), request_id=f"r{i}") for i in range(16)]
    out = Sampler(CPU).sample(logits, rows)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 16
    assert torch.equal(logits, before)  # input untouched


def test_mixed_greedy_and_sampled_rows() -> None:
    vocab = 30
    logits = _logits(6, vocab, seed=2, scale=0.5)
    greedy = [i % 2 == 0 for i in range(6)]
    rows = [
        _row(SamplingParams(temperature=0.0) if g else SamplingParams(temperature=1.0, top_k=4), f"r{i}")
        for i, g in enumerate(greedy)
    ]
    sampler = Sampler(CPU, seed=7)
    seen: dict[int, set[int]] = {i: set() for i in range(6)}
    for _ in range(200):
        for i, token in enumerate(sampler.sample(logits, rows).token_ids):
            seen[i].add(token)
    top4 = logits.topk(4, dim=-1).indices
    for i, g in enumerate(greedy):
        if g:
            assert seen[i] == {int(logits[i].argmax())}
        else:
            assert seen[i] <= set(top4[i].tolist())
            assert len(seen[i]) > 1  # really random


# -------------------------------------------------------------------------------------------- filters


def _reference_allowed(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Tokens top-k, then top-p, then min-p keep, computed one row at a time in float64."""
    x = logits.double().numpy()
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-x, kind="stable")
    kept = list(order[:top_k] if top_k > 0 else order)
    kept_probs = probs[kept] / probs[kept].sum()
    mass = 0.0
    after_p = []
    for token, p in zip(kept, kept_probs):
        if mass >= top_p:
            break
        after_p.append(int(token))
        mass += p
    return {t for t in after_p if probs[t] >= min_p * probs.max()}


FILTER_CASES = [
    (5, 1.0, 0.0),
    (1, 1.0, 0.0),
    (0, 0.6, 0.0),
    (0, 0.05, 0.0),
    (0, 1.0, 0.1),
    (10, 0.8, 0.0),
    (20, 0.9, 0.05),
    (-1, 0.7, 0.02),
]


def test_filters_match_reference_masks() -> None:
    vocab = 64
    logits = _logits(len(FILTER_CASES), vocab, seed=3)
    out = _apply_filters(
        logits.clone(),
        top_k=torch.tensor([k if k > 0 else vocab for k, _, _ in FILTER_CASES]),
        top_p=torch.tensor([p if p < 1 else math.inf for _, p, _ in FILTER_CASES]),
        min_p=torch.tensor([m for _, _, m in FILTER_CASES]),
    )
    for i, (k, p, m) in enumerate(FILTER_CASES):
        kept = set(torch.nonzero(out[i] > -math.inf).flatten().tolist())
        assert kept == _reference_allowed(logits[i], k, p, m), (k, p, m)
        # Surviving logits are unchanged.
        assert torch.equal(out[i][list(kept)], logits[i][list(kept)])


def test_top_k_keeps_exactly_k_largest() -> None:
    logits = _logits(4, 50, seed=4)
    ks = [1, 3, 17, 49]
    out = _apply_filters(logits.clone(), top_k=torch.tensor(ks), top_p=None, min_p=None)
    for i, k in enumerate(ks):
        kept = set(torch.nonzero(out[i] > -math.inf).flatten().tolist())
        assert kept == set(logits[i].topk(k).indices.tolist())


def test_sampled_tokens_stay_in_allowed_set() -> None:
    vocab = 40
    logits = _logits(len(FILTER_CASES), vocab, seed=5, scale=1.0)
    temperature = 1.3
    rows = [
        _row(SamplingParams(temperature=temperature, top_k=k, top_p=p, min_p=m), f"r{i}")
        for i, (k, p, m) in enumerate(FILTER_CASES)
    ]
    allowed = [
        _reference_allowed(logits[i] / temperature, k, p, m) for i, (k, p, m) in enumerate(FILTER_CASES)
    ]
    batch = logits.repeat(250, 1)  # 250 draws per case in one call
    out = Sampler(CPU, seed=11).sample(batch, rows * 250)
    drawn: dict[int, set[int]] = {i: set() for i in range(len(FILTER_CASES))}
    for j, token in enumerate(out.token_ids):
        drawn[j % len(FILTER_CASES)].add(token)
    for i in drawn:
        assert drawn[i] <= allowed[i]
        if len(allowed[i]) > 1:
            assert len(drawn[i]) > 1


# -------------------------------------------------------------------------------------- distribution


def _frequencies(tokens: list[int], vocab: int) -> np.ndarray:
    return np.bincount(np.asarray(tokens), minlength=vocab) / len(tokens)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    vocab, draws = 8, 20_000
    logits = _logits(1, vocab, seed=6, scale=1.0)
    expected = torch.softmax(logits[0].double() / temperature, dim=-1).numpy()
    rows = [_row(SamplingParams(temperature=temperature), f"r{i}") for i in range(draws)]
    out = Sampler(CPU, seed=12).sample(logits.expand(draws, vocab), rows)
    freq = _frequencies(out.token_ids, vocab)
    stderr = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(freq - expected) < 5 * stderr + 1e-9), (freq, expected)


def test_seeded_rows_follow_the_distribution_too() -> None:
    vocab, draws = 6, 5_000
    logits = _logits(1, vocab, seed=8, scale=1.0)
    expected = torch.softmax(logits[0].double(), dim=-1).numpy()
    rows = [_row(SamplingParams(seed=1000 + i), f"s{i}") for i in range(draws)]
    out = Sampler(CPU).sample(logits.expand(draws, vocab), rows)
    freq = _frequencies(out.token_ids, vocab)
    stderr = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(freq - expected) < 5 * stderr), (freq, expected)


# ------------------------------------------------------------------------------------------ penalties


def _reference_penalties(
    logits: torch.Tensor, prompt: Sequence[int], output: Sequence[int], rep: float, freq: float, pres: float
) -> torch.Tensor:
    x = logits.clone().double()
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t in set(output):
        c = output.count(t)
        x[t] -= freq * c + pres
    return x


def test_penalties_match_hand_reference() -> None:
    vocab = 20
    logits = _logits(4, vocab, seed=9)
    cases = [
        # (repetition, frequency, presence)
        (1.5, 0.0, 0.0),
        (0.7, 0.4, -0.3),
        (1.0, 0.5, 1.0),
        (1.0, 0.0, 0.0),  # no penalty: unchanged
    ]
    rows, prompts, outputs = [], [], []
    for i, (rep, freq, pres) in enumerate(cases):
        order = logits[i].argsort(descending=True).tolist()
        # Prompt holds the largest (positive) and smallest (negative) logits; output repeats some.
        prompt = [order[0], order[-1], order[5]]
        output = [order[1], order[1], order[1], order[-2], order[5], order[-1]]
        assert logits[i, order[0]] > 0 > logits[i, order[-1]]
        prompts.append(prompt)
        outputs.append(output)
        params = SamplingParams(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
        rows.append(_row(params, f"r{i}", prompt=prompt, output=output))
    x = logits.clone()
    _apply_penalties(x, rows)
    for i, (rep, freq, pres) in enumerate(cases):
        expected = _reference_penalties(logits[i], prompts[i], outputs[i], rep, freq, pres)
        torch.testing.assert_close(x[i].double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(x[3], logits[3])


def test_penalties_skipped_when_unused() -> None:
    logits = _logits(3, 10, seed=10)
    x = logits.clone()
    _apply_penalties(x, [_row(SamplingParams(), f"r{i}", output=(1, 1, 2)) for i in range(3)])
    assert torch.equal(x, logits)


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = _logits(1, 10, seed=13)
    top = int(logits[0].argmax())
    second = int(logits[0].topk(2).indices[1])
    assert logits[0, top] > 0
    row = _row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=(top,))
    assert logits[0, top] / 2 < logits[0, second]  # the penalty demotes the top token below the second
    assert Sampler(CPU).sample(logits, [row]).token_ids == [second]
    row = _row(SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0), output=(top,))
    expected = int(torch.where(torch.arange(10) == top, logits[0] - 4.0, logits[0]).argmax())
    assert Sampler(CPU).sample(logits, [row]).token_ids == [expected]


# ---------------------------------------------------------------------------------------- min_tokens


def test_min_tokens_blocks_eos_and_stop_ids_until_reached() -> None:
    vocab, stop = 12, 7
    logits = _logits(1, vocab, seed=14)
    peak = float(logits.max())
    logits[0, EOS] = peak + 10
    logits[0, stop] = peak + 5
    third = int(logits[0].argsort(descending=True)[2])
    params = SamplingParams(temperature=0.0, min_tokens=3, max_tokens=10, stop_token_ids=(stop,))
    sampler = Sampler(CPU)
    for n_out in range(3):
        row = _row(params, output=list(range(n_out)))
        assert sampler.sample(logits, [row]).token_ids == [third]
    assert sampler.sample(logits, [_row(params, output=[0, 1, 2])]).token_ids == [EOS]

    # ignore_eos: EOS is not a stop, so it stays allowed; stop ids are still blocked.
    ignoring = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(stop,), ignore_eos=True)
    assert sampler.sample(logits, [_row(ignoring, output=[0])]).token_ids == [EOS]
    logits[0, EOS] = -10.0
    assert sampler.sample(logits, [_row(ignoring, output=[0])]).token_ids != [stop]


def test_min_tokens_with_random_sampling_never_draws_eos() -> None:
    vocab, draws = 6, 2_000
    logits = _logits(1, vocab, seed=15, scale=0.3).expand(draws, vocab).clone()
    eos_ids = (EOS, 5)
    short = [_row(SamplingParams(min_tokens=2), f"r{i}", output=(1,), eos=eos_ids) for i in range(draws // 2)]
    done = [
        _row(SamplingParams(min_tokens=2), f"d{i}", output=(1, 2), eos=eos_ids) for i in range(draws // 2)
    ]
    out = Sampler(CPU, seed=3).sample(logits, short + done).token_ids
    assert not {EOS, 5} & set(out[: draws // 2])
    assert {EOS, 5} <= set(out[draws // 2 :])


# --------------------------------------------------------------------------------------------- seeds


def _run_seeded(
    sampler: Sampler, steps: list[torch.Tensor], target: SamplingParams, position: int, others: int
) -> list[int]:
    """Sample the ``target`` row for every step, at ``position`` among ``others`` random rows."""
    tokens: list[int] = []
    for step, row_logits in enumerate(steps):
        filler = _logits(others, row_logits.shape[0], seed=100 + step)
        batch = torch.cat([filler[:position], row_logits.unsqueeze(0), filler[position:]])
        rows = [_row(SamplingParams(), f"other{i}") for i in range(others)]
        rows.insert(position, _row(target, "target", output=tokens))
        out = sampler.sample(batch, rows)
        tokens.append(out.token_ids[position])
        if others:  # steps without the target must not advance its generator
            sampler.sample(filler, [_row(SamplingParams(seed=5), f"x{i}") for i in range(others)])
    return tokens


def test_same_seed_same_tokens_regardless_of_batch() -> None:
    vocab = 25
    steps = list(_logits(12, vocab, seed=16, scale=0.5))
    params = SamplingParams(seed=1234, top_p=0.95, max_tokens=20)
    alone = _run_seeded(Sampler(CPU, seed=0), steps, params, position=0, others=0)
    batched = _run_seeded(Sampler(CPU, seed=99), steps, params, position=3, others=5)
    front = _run_seeded(Sampler(CPU, seed=42), steps, params, position=0, others=2)
    assert alone == batched == front
    other_seed = _run_seeded(Sampler(CPU), steps, SamplingParams(seed=4321, top_p=0.95, max_tokens=20), 0, 0)
    assert other_seed != alone


def test_release_resets_the_request_generator() -> None:
    vocab = 50
    logits = _logits(1, vocab, seed=17, scale=0.2)
    row = _row(SamplingParams(seed=77))
    sampler = Sampler(CPU)
    first = [sampler.sample(logits, [row]).token_ids[0] for _ in range(8)]
    assert sampler.num_seeded_requests == 1
    again = [sampler.sample(logits, [row]).token_ids[0] for _ in range(8)]
    assert again != first  # the generator kept advancing
    sampler.release("r")
    assert sampler.num_seeded_requests == 0
    assert [sampler.sample(logits, [row]).token_ids[0] for _ in range(8)] == first
    sampler.release("unknown")  # harmless


# ------------------------------------------------------------------------------------------ logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax_with_ranks(dtype: torch.dtype) -> None:
    vocab = 40
    logits = _logits(5, vocab, seed=18).to(dtype)
    settings = [None, 0, 3, 5, 20]
    rows = [
        _row(
            SamplingParams(logprobs=n, temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.5),
            f"r{i}",
            output=(0, 1, 1),
        )
        for i, n in enumerate(settings)
    ]
    out = Sampler(CPU, seed=5).sample(logits, rows)
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs[0] is None
    for i, n in enumerate(settings[1:], start=1):
        entry = out.logprobs[i]
        assert entry is not None
        token = out.token_ids[i]
        assert token in entry
        top = reference[i].topk(n).indices.tolist() if n else []
        assert set(entry) == set(top) | {token}
        for token_id, lp in entry.items():
            assert lp.logprob == pytest.approx(float(reference[i, token_id]), abs=1e-6)
            assert lp.rank == 1 + int((reference[i] > reference[i, token_id]).sum())
            assert lp.decoded_token is None
        if n:
            assert sorted(entry[t].rank for t in top) == list(range(1, n + 1))


def test_logprobs_zero_returns_only_the_sampled_token() -> None:
    logits = _logits(3, 30, seed=19)
    rows = [_row(SamplingParams(logprobs=0, temperature=t), f"r{i}") for i, t in enumerate((0.0, 1.0, 0.5))]
    out = Sampler(CPU).sample(logits, rows)
    for i, entry in enumerate(out.logprobs):
        assert entry is not None and list(entry) == [out.token_ids[i]]
    assert out.logprobs[0] is not None
    assert out.logprobs[0][out.token_ids[0]].rank == 1  # greedy without penalties picks rank 1


# ------------------------------------------------------------------------------------------- misc


def test_rejects_mismatched_shapes_and_handles_empty_batch() -> None:
    sampler = Sampler(CPU)
    with pytest.raises(ValueError):
        sampler.sample(_logits(2, 10, seed=20), [_row(SamplingParams())])
    out = sampler.sample(torch.empty(0, 10), [])
    assert out.token_ids == [] and out.logprobs == []

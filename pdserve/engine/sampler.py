"""Turns one step's logits into next tokens: logprobs, min_tokens, penalties, filters and the random draw.

Semantics follow vLLM's sampler (see :class:`~pdserve.common.sampling_params.SamplingParams`). All
math runs batched on the logits' device in float32; per-row parameters travel to the device as a
handful of tensors built once per step, and the result comes back to the host in one transfer, which
:meth:`Sampler.sample_async` only starts: the picks stay usable on the device (the next step's inputs)
and the host reads them when it needs them (:meth:`SampledTokens.resolve`).

Order of operations for one step:

1. logprobs, from the *raw* logits (``log_softmax`` before anything below touches them);
2. ``min_tokens``: EOS and stop token ids get ``-inf`` while the request is too short;
3. repetition / frequency / presence penalties;
4. greedy rows take the argmax here; the other rows are divided by their temperature, then filtered
   by top-k, top-p and min-p (in that order);
5. the draw: ``argmax(probs / q)`` with ``q ~ Exp(1)`` (the exponential race, equivalent to
   Gumbel-max), where seeded requests draw ``q`` from their own generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.common.outputs import Logprob, TokenLogprobs
from pdserve.common.sampling_params import SamplingParams

_MIN_TEMPERATURE = 1e-5
"""Temperatures below this are treated as greedy: dividing logits by them overflows float32."""


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one row of the logits.

    Every token id (prompt, output, EOS, stop) must lie in ``[0, vocab)`` of the logits, except that
    EOS and stop ids outside it are ignored.
    """

    request_id: str
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # tokens generated so far, before this step, known on the host
    eos_token_ids: tuple[int, ...]  # the model's EOS ids; blocked before min_tokens unless ignore_eos
    num_pending_tokens: int = 0  # generated on the device, not yet in output_token_ids (no penalties then)

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids) + self.num_pending_tokens


@dataclass
class SamplerOutput:
    """The tokens chosen for one step, one per row, in the rows' order.

    ``logprobs[i]`` is ``None`` unless row ``i`` asked for logprobs; otherwise it maps the sampled
    token and the row's top-n tokens to their raw log-probabilities and ranks (``decoded_token`` is
    left ``None`` for the detokenizer to fill).
    """

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class SampledTokens:
    """One step's picks: on the device at once (``token_ids``, int64 ``[rows]``), on the host after
    :meth:`resolve`, which waits for the one device-to-host copy started when they were drawn."""

    def __init__(self, token_ids: torch.Tensor, payload: torch.Tensor,
                 logprob_rows: list[tuple[int, int]], max_n: int) -> None:
        self.token_ids = token_ids
        self._logprob_rows = logprob_rows  # (row, requested n)
        self._max_n = max_n
        self._event: torch.cuda.Event | None = None
        if payload.device.type == "cuda":
            self._host = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
            self._host.copy_(payload, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = payload
        self._resolved: SamplerOutput | None = None

    @property
    def num_rows(self) -> int:
        return int(self.token_ids.shape[0])

    def is_ready(self) -> bool:
        """Whether :meth:`resolve` would return without waiting for the device."""
        return self._resolved is not None or self._event is None or self._event.query()

    def resolve(self) -> SamplerOutput:
        if self._resolved is None:
            if self._event is not None:
                self._event.synchronize()
            self._resolved = self._unpack(self._host.tolist())
        return self._resolved

    def _unpack(self, host: list) -> SamplerOutput:
        rows = self.num_rows
        token_ids = [int(t) for t in host[:rows]]
        logprobs: list[TokenLogprobs | None] = [None] * rows
        width = 2 + 3 * self._max_n
        for j, (i, requested) in enumerate(self._logprob_rows):
            start = rows + j * width
            logprobs[i] = _unpack_logprobs(token_ids[i], host[start : start + width], min(requested, self._max_n),
                                           self._max_n)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


class Sampler:
    """Samples the next token of every row of a batch of logits.

    Unseeded rows share one generator, seeded from ``seed`` here. A row whose ``params.seed`` is set
    gets a private generator, created from that seed the first time its request samples and kept
    under its ``request_id`` until :meth:`release`; it advances only when that request draws, so the
    request's tokens do not depend on which other requests share the batch, in what order.
    """

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = _with_index(torch.device(device))
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    @property
    def num_seeded_requests(self) -> int:
        """How many requests currently hold a private generator."""
        return len(self._request_generators)

    def skip_draws(self, request_id: str, seed: int, vocab_size: int, num_draws: int) -> None:
        """Advance a seeded request's private generator past ``num_draws`` samples made elsewhere (the
        prefill worker sampled its first token), so the rest of its tokens match a single engine's."""
        row = SamplingRow(request_id, SamplingParams(seed=seed), (), (), ())
        generator = self._request_generator(row, self.device)
        scratch = torch.empty(vocab_size, dtype=torch.float32, device=self.device)
        for _ in range(num_draws):
            scratch.exponential_(generator=generator)

    def release(self, request_id: str) -> None:
        """Forget the request's private generator, if any. Call it when the request finishes."""
        self._request_generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """Pick one token per row of ``logits`` (``[N, V]``, any float dtype, ``N == len(rows)``) and
        wait for the picks on the host (the one device-to-host synchronisation)."""
        return self.sample_async(logits, rows).resolve()

    def sample_async(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampledTokens:
        """Launch the sampling of every row of ``logits`` (on this sampler's device, not modified) and
        the copy of the result to the host, without waiting for either."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        if logits.device != self.device:
            raise ValueError(f"logits are on {logits.device}, the sampler on {self.device}")
        if not rows:
            empty = torch.zeros(0, dtype=torch.long, device=logits.device)
            return SampledTokens(empty, empty, [], 0)
        x = logits.to(dtype=torch.float32, copy=True)

        logprob_rows = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        logprob_index = _to_device(logprob_rows, torch.long, x.device) if logprob_rows else None
        raw_logprobs = None
        if logprob_index is not None:
            raw_logprobs = torch.log_softmax(x.index_select(0, logprob_index), dim=-1)

        _block_stop_tokens(x, rows)
        _apply_penalties(x, rows)

        greedy = [row.params.temperature < _MIN_TEMPERATURE for row in rows]
        if all(greedy):
            tokens = x.argmax(dim=-1)
        else:
            greedy_tokens = x.argmax(dim=-1) if any(greedy) else None
            tokens = self._sample_random(x, rows, greedy)
            if greedy_tokens is not None:
                is_greedy = _to_device(greedy, torch.bool, x.device)
                tokens = torch.where(is_greedy, greedy_tokens, tokens)

        if raw_logprobs is None or logprob_index is None:
            return SampledTokens(tokens, tokens, [], 0)
        max_n = min(max(rows[i].params.logprobs or 0 for i in logprob_rows), x.shape[1])
        packed = _pack_logprobs(raw_logprobs, tokens.index_select(0, logprob_index), max_n)
        payload = torch.cat([tokens.to(torch.float64), packed.flatten()])  # the one transfer
        return SampledTokens(tokens, payload, [(i, rows[i].params.logprobs or 0) for i in logprob_rows], max_n)

    def _sample_random(
        self, x: torch.Tensor, rows: Sequence[SamplingRow], greedy: list[bool]
    ) -> torch.Tensor:
        """Temperature, filters and the exponential race, for every row (greedy rows' picks discarded).

        Greedy rows go through with neutral parameters and unit noise, and their generators (if any)
        are not advanced. ``x`` is overwritten.
        """
        device = x.device
        params = [row.params for row in rows]
        temperature = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        x.div_(_to_device(temperature, torch.float32, device).unsqueeze(1))

        top_k = [0 if g else p.top_k for g, p in zip(greedy, params)]
        top_p = [1.0 if g else p.top_p for g, p in zip(greedy, params)]
        min_p = [0.0 if g else p.min_p for g, p in zip(greedy, params)]
        vocab = x.shape[1]
        x = _apply_filters(
            x,
            top_k=_to_device([k if 0 < k < vocab else vocab for k in top_k], torch.long, device)
            if any(0 < k < vocab for k in top_k)
            else None,
            top_p=_to_device([p if p < 1.0 else math.inf for p in top_p], torch.float32, device)
            if any(p < 1.0 for p in top_p)
            else None,
            min_p=_to_device(min_p, torch.float32, device) if any(p > 0.0 for p in min_p) else None,
        )
        probs = torch.softmax(x, dim=-1)
        noise = self._draw_noise(probs, rows, greedy)
        return probs.div_(noise).argmax(dim=-1)

    def _draw_noise(
        self, probs: torch.Tensor, rows: Sequence[SamplingRow], greedy: list[bool]
    ) -> torch.Tensor:
        """``Exp(1)`` noise shaped like ``probs``: one batched draw from the shared generator for the
        unseeded rows, then one draw per seeded row from that request's own generator."""
        seeded = [i for i, (row, g) in enumerate(zip(rows, greedy)) if not g and row.params.seed is not None]
        if len(seeded) + sum(greedy) < len(rows):
            noise = torch.empty_like(probs).exponential_(generator=self._generator)
        else:
            noise = torch.ones_like(probs)
        for i in seeded:
            noise[i].exponential_(generator=self._request_generator(rows[i], probs.device))
        # Exp(1) may round to 0; 0 / 0 would be NaN, which argmax would pick.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    def _request_generator(self, row: SamplingRow, device: torch.device) -> torch.Generator:
        generator = self._request_generators.get(row.request_id)
        if generator is None:
            assert row.params.seed is not None
            generator = torch.Generator(device=device)
            generator.manual_seed(row.params.seed)
            self._request_generators[row.request_id] = generator
        return generator


def _with_index(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``, so that it compares equal to the device tensors report."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _to_device(values: Sequence[object], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor, copied asynchronously (from pinned memory on CUDA)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _padded(token_lists: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor | None:
    """``[N, L]`` token ids, each row padded with ``pad``; ``None`` when every list is empty."""
    width = max(len(tokens) for tokens in token_lists)
    if width == 0:
        return None
    padded = np.full((len(token_lists), width), pad, dtype=np.int64)
    for i, tokens in enumerate(token_lists):  # host-side fill; numpy converts each list in C
        padded[i, : len(tokens)] = tokens
    host = torch.from_numpy(padded)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _block_stop_tokens(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Set EOS (unless ``ignore_eos``) and ``stop_token_ids`` to ``-inf`` in rows short of min_tokens."""
    vocab = x.shape[1]
    row_index: list[int] = []
    col_index: list[int] = []
    for i, row in enumerate(rows):
        p = row.params
        if row.num_generated >= p.min_tokens:
            continue
        blocked = p.stop_token_ids if p.ignore_eos else (*row.eos_token_ids, *p.stop_token_ids)
        for token in blocked:
            if 0 <= token < vocab:
                row_index.append(i)
                col_index.append(token)
    if row_index:
        index = _to_device([row_index, col_index], torch.long, x.device)
        x[index[0], index[1]] = -math.inf


def _apply_penalties(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Apply repetition, frequency and presence penalties to ``x`` in place; no-op when none is used.

    Token counts are built by scattering padded token tensors into ``[N, V + 1]`` (the extra column
    swallows the padding), so the work is a few batched kernels whatever the batch holds.
    """
    repetition = [row.params.repetition_penalty for row in rows]
    frequency = [row.params.frequency_penalty for row in rows]
    presence = [row.params.presence_penalty for row in rows]
    uses_repetition = [r != 1.0 for r in repetition]
    uses_additive = [f != 0.0 or p != 0.0 for f, p in zip(frequency, presence)]
    if not any(uses_repetition) and not any(uses_additive):
        return
    n, vocab = x.shape
    device = x.device

    outputs = _padded(
        [
            row.output_token_ids if rep or add else ()
            for row, rep, add in zip(rows, uses_repetition, uses_additive)
        ],
        pad=vocab,
        device=device,
    )
    counts = torch.zeros(n, vocab + 1, dtype=x.dtype, device=device)
    if outputs is not None:
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=x.dtype))
    counts = counts[:, :vocab]

    if any(uses_repetition):
        seen = counts > 0
        prompts = _padded(
            [row.prompt_token_ids if rep else () for row, rep in zip(rows, uses_repetition)], vocab, device
        )
        if prompts is not None:
            in_prompt = torch.zeros(n, vocab + 1, dtype=torch.bool, device=device)
            in_prompt.scatter_(1, prompts, True)
            seen |= in_prompt[:, :vocab]
        penalty = _to_device(repetition, torch.float32, device).unsqueeze(1)
        penalised = torch.where(x > 0, x / penalty, x * penalty)
        x.copy_(torch.where(seen, penalised, x))

    if any(uses_additive):
        freq = _to_device(frequency, torch.float32, device).unsqueeze(1)
        pres = _to_device(presence, torch.float32, device).unsqueeze(1)
        x -= freq * counts + pres * (counts > 0).to(x.dtype)


def _apply_filters(
    x: torch.Tensor,
    *,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """Mask (to ``-inf``) the tokens that top-k, then top-p, then min-p drop; returns the masked logits.

    Each per-row tensor is ``None`` when no row uses that filter; a row that does not use it carries a
    neutral value (``top_k == vocab``, ``top_p == inf``, ``min_p == 0``). top-k keeps exactly the ``k``
    largest; top-p keeps a token iff the mass of the tokens ranked above it (after top-k) is below
    ``p``, so the top token always survives; min-p drops tokens with ``prob < min_p * max prob``.
    """
    if top_k is not None or top_p is not None:
        sorted_x, order = x.sort(dim=-1, descending=True)
        if top_k is not None:
            position = torch.arange(x.shape[1], device=x.device)
            sorted_x.masked_fill_(position.unsqueeze(0) >= top_k.unsqueeze(1), -math.inf)
        if top_p is not None:
            sorted_probs = torch.softmax(sorted_x, dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_x.masked_fill_(mass_before >= top_p.unsqueeze(1), -math.inf)
        x = torch.empty_like(x).scatter_(1, order, sorted_x)
    if min_p is not None:
        # prob / max_prob == exp(logit - max_logit), whatever was masked before (the max never is).
        threshold = x.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)
        x = x.masked_fill(x < threshold, -math.inf)
    return x


def _pack_logprobs(raw_logprobs: torch.Tensor, tokens: torch.Tensor, max_n: int) -> torch.Tensor:
    """``[M, 2 + 3 * max_n]`` float64: sampled logprob, its rank, then top-n ids, logprobs and ranks.

    A rank is 1 + the number of tokens with a strictly greater logprob. Within the top-n that count
    only involves other top-n tokens, so their ranks come from an ``[M, n, n]`` comparison.
    """
    sampled = raw_logprobs.gather(1, tokens.unsqueeze(1))
    rank = (raw_logprobs > sampled).sum(dim=-1, keepdim=True) + 1
    parts = [sampled.to(torch.float64), rank.to(torch.float64)]
    if max_n > 0:
        values, ids = raw_logprobs.topk(max_n, dim=-1)
        ranks = (values.unsqueeze(1) > values.unsqueeze(2)).sum(dim=-1) + 1
        parts += [ids.to(torch.float64), values.to(torch.float64), ranks.to(torch.float64)]
    return torch.cat(parts, dim=1)


def _unpack_logprobs(token: int, packed: list[float], n: int, max_n: int) -> TokenLogprobs:
    """One row of :func:`_pack_logprobs` as ``{sampled: Logprob, top-n ids...: Logprob}``."""
    out: TokenLogprobs = {token: Logprob(logprob=packed[0], rank=int(packed[1]))}
    for j in range(n):
        token_id = int(packed[2 + j])
        if token_id not in out:
            out[token_id] = Logprob(logprob=packed[2 + max_n + j], rank=int(packed[2 + 2 * max_n + j]))
    return out

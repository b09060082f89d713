"""``LLM``: the offline, in-process API (``from pdserve import LLM, SamplingParams``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pdserve.common.config import TINY_RANDOM_MODEL, EngineConfig
from pdserve.common.errors import InvalidParameterError
from pdserve.common.outputs import RequestDelta, RequestOutput
from pdserve.common.sampling_params import SamplingParams
from pdserve.engine.engine import LLMEngine


class LLM:
    """Generate completions for a batch of prompts on one engine.

    ``LLM(model="path/or/tiny-random", dtype="auto", max_model_len=None, block_size=16, ...)``: every
    keyword is an :class:`EngineConfig` field. ``generate`` validates every prompt before computing
    anything, then runs the engine until all requests finish, and returns outputs in prompt order.
    """

    def __init__(self, model: str = TINY_RANDOM_MODEL, **engine_kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **engine_kwargs)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):  # noqa: ANN201 (the engine's Tokenizer)
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        texts, id_lists = _normalize_prompts(prompts, prompt_token_ids)
        n = len(texts)
        params = _normalize_params(sampling_params, n)
        encoded = [self.engine.encode_prompt(texts[i], id_lists[i]) for i in range(n)]
        request_ids = [f"llm-{next(self._ids)}" for _ in range(n)]
        outputs = {rid: RequestOutput(rid, texts[i], encoded[i]) for i, rid in enumerate(request_ids)}
        try:
            for i, rid in enumerate(request_ids):
                self.engine.add_request(rid, prompt_token_ids=encoded[i], params=params[i])
                outputs[rid].prompt = texts[i]
                if params[i].logprobs is not None:
                    outputs[rid].logprobs = []
            with tqdm(total=n, desc="generate", unit="req", disable=not use_tqdm) as bar:
                remaining = n
                while remaining:
                    for delta in self.engine.step():
                        _apply(outputs[delta.request_id], delta)
                        if delta.finished:
                            remaining -= 1
                            bar.update(1)
        finally:
            for rid in request_ids:
                if not outputs[rid].finished:
                    self.engine.abort_request(rid)
        return [outputs[rid] for rid in request_ids]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then :meth:`generate`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.tokenizer.encode_chat(conv) for conv in conversations]
        return self.generate(sampling_params=sampling_params, prompt_token_ids=ids, use_tqdm=use_tqdm)


def _apply(output: RequestOutput, delta: RequestDelta) -> None:
    output.token_ids.extend(delta.new_token_ids)
    output.text += delta.new_text
    if delta.new_logprobs is not None and output.logprobs is not None:
        output.logprobs.extend(delta.new_logprobs)
    output.num_cached_tokens = delta.num_cached_tokens
    if delta.finished:
        output.finished = True
        output.finish_reason = delta.finish_reason
        output.stop_reason = delta.stop_reason
        output.error = delta.error


def _normalize_prompts(prompts: str | Sequence[str] | None, prompt_token_ids: Sequence[Sequence[int]] | None
                       ) -> tuple[list[str | None], list[list[int] | None]]:
    if (prompts is None) == (prompt_token_ids is None):
        raise InvalidParameterError("prompts", "give exactly one of prompts or prompt_token_ids")
    if prompts is not None:
        texts: list[str | None] = [prompts] if isinstance(prompts, str) else list(prompts)
        return texts, [None] * len(texts)
    assert prompt_token_ids is not None
    if prompt_token_ids and isinstance(prompt_token_ids[0], int):
        raise InvalidParameterError("prompt_token_ids", "must be a list of token-id lists, one per prompt")
    id_lists = [list(ids) for ids in prompt_token_ids]
    return [None] * len(id_lists), id_lists  # type: ignore[return-value]


def _normalize_params(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidParameterError("sampling_params", f"got {len(params)} for {n} prompts; give one, or one per prompt")
    return params

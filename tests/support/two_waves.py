"""Serve prompts through an engine in two waves, so later prompts' chunks share steps with decodes."""

from __future__ import annotations

from pdserve import LLM, SamplingParams


def two_waves(llm: LLM, prompts: list[str] | list[list[int]], params: SamplingParams) -> list[list[int]]:
    """The tokens of each prompt (text or token ids): the first two are added and run three steps, the
    rest arrive while those decode."""
    engine = llm.engine
    tokens: dict[str, list[int]] = {}

    def add(i: int, prompt: str | list[int]) -> None:
        if isinstance(prompt, str):
            engine.add_request(f"r{i}", prompt=prompt, params=params)
        else:
            engine.add_request(f"r{i}", prompt_token_ids=prompt, params=params)

    for i, prompt in enumerate(prompts[:2]):
        add(i, prompt)
    for _ in range(3):
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
    for i, prompt in enumerate(prompts[2:], start=2):
        add(i, prompt)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
    return [tokens[f"r{i}"] for i in range(len(prompts))]

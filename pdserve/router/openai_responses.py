"""The router's answers as OpenAI JSON: ``text_completion`` and ``chat.completion`` objects, their
streamed chunks, usage, logprobs, models and errors. Built from ``GenerateResponse`` messages."""

from __future__ import annotations

import time
from typing import Any

from pdserve.v1 import common_pb2, pdserve_pb2

FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                  common_pb2.FINISH_REASON_ABORT: "abort"}


def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


def _sampled(response: pdserve_pb2.GenerateResponse) -> list[tuple[str, float | None, list[common_pb2.Logprob]]]:
    """Per generated token of ``response``: its text, its logprob, and every entry of its position
    (the top alternatives and the sampled token), most likely first."""
    out = []
    for token_id, position in zip(response.token_ids, response.logprobs, strict=False):
        chosen = next((e for e in position.entries if e.token_id == token_id), None)
        out.append((chosen.decoded_token if chosen is not None else "", chosen.logprob if chosen is not None else None,
                    sorted(position.entries, key=lambda e: e.rank)))
    return out


def completion_logprobs(response: pdserve_pb2.GenerateResponse, text_offset: int) -> dict[str, Any] | None:
    """OpenAI's legacy ``logprobs`` object for the tokens of ``response`` (``None`` without logprobs)."""
    if not response.logprobs:
        return None
    sampled = _sampled(response)
    offsets = []
    for text, _, _ in sampled:
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": [t for t, _, _ in sampled], "token_logprobs": [lp for _, lp, _ in sampled],
            "top_logprobs": [{e.decoded_token: e.logprob for e in entries} for _, _, entries in sampled],
            "text_offset": offsets}


def usage_json(usage: common_pb2.Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


def completion_json(response: pdserve_pb2.GenerateResponse, model: str, created: int, *, chunk: bool,
                    text_offset: int = 0) -> dict[str, Any]:
    """One ``text_completion`` object: a whole answer, or (``chunk``) one streamed piece."""
    choice = {"index": 0, "text": response.text, "logprobs": completion_logprobs(response, text_offset),
              "finish_reason": _finish(response)}
    if response.WhichOneof("stop_reason") is not None:
        choice["stop_reason"] = getattr(response, response.WhichOneof("stop_reason"))
    body: dict[str, Any] = {"id": completion_id(response.request_id), "object": "text_completion",
                            "created": created, "model": model, "choices": [choice]}
    if not chunk:
        body["usage"] = usage_json(response.usage)
    return body


def usage_chunk(request_id: str, usage: common_pb2.Usage, model: str, created: int, *, chat: bool = False
                ) -> dict[str, Any]:
    """The last streamed chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {"id": chat_id(request_id) if chat else completion_id(request_id),
            "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": model,
            "choices": [], "usage": usage_json(usage)}


def models_json(model: str, max_model_len: int, created: int | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": model, "object": "model", "created": created or int(time.time()),
                            "owned_by": "pdserve"}
    if max_model_len:
        card["max_model_len"] = max_model_len
    return {"object": "list", "data": [card]}


def error_json(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _finish(response: pdserve_pb2.GenerateResponse) -> str | None:
    return FINISH_REASONS.get(response.finish_reason) if response.finish_reason else None


def chat_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def chat_logprobs(response: pdserve_pb2.GenerateResponse) -> dict[str, Any] | None:
    """The chat API's ``logprobs`` object: per generated token, its logprob and the top alternatives."""
    if not response.logprobs:
        return None
    return {"content": [{"token": text, "logprob": logprob, "bytes": list(text.encode()),
                         "top_logprobs": [{"token": e.decoded_token, "logprob": e.logprob,
                                           "bytes": list(e.decoded_token.encode())} for e in entries]}
                        for text, logprob, entries in _sampled(response)]}


def chat_json(response: pdserve_pb2.GenerateResponse, model: str, created: int) -> dict[str, Any]:
    """A whole ``chat.completion`` answer."""
    return {"id": chat_id(response.request_id), "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": response.text},
                         "logprobs": chat_logprobs(response), "finish_reason": _finish(response)}],
            "usage": usage_json(response.usage)}


def chat_chunk(response: pdserve_pb2.GenerateResponse, model: str, created: int, first: bool) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk``; the first one also carries the assistant role."""
    delta: dict[str, Any] = {"content": response.text}
    if first:
        delta = {"role": "assistant", **delta}
    return {"id": chat_id(response.request_id), "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": chat_logprobs(response),
                                         "finish_reason": _finish(response)}]}

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


def completion_logprobs(response: pdserve_pb2.GenerateResponse, text_offset: int) -> dict[str, Any] | None:
    """OpenAI's legacy ``logprobs`` object for the tokens of ``response`` (``None`` without logprobs)."""
    if not response.logprobs:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for token_id, position in zip(response.token_ids, response.logprobs, strict=False):
        entries = {e.token_id: e for e in position.entries}
        chosen = entries.get(token_id)
        text = chosen.decoded_token if chosen is not None else ""
        tokens.append(text)
        token_logprobs.append(chosen.logprob if chosen is not None else None)
        top.append({e.decoded_token: e.logprob for e in position.entries})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


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


def usage_chunk(request_id: str, usage: common_pb2.Usage, model: str, created: int) -> dict[str, Any]:
    """The last streamed chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {"id": completion_id(request_id), "object": "text_completion", "created": created, "model": model,
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
    content = []
    for token_id, position in zip(response.token_ids, response.logprobs, strict=False):
        entries = {e.token_id: e for e in position.entries}
        chosen = entries.get(token_id)
        text = chosen.decoded_token if chosen is not None else ""
        content.append({"token": text, "logprob": chosen.logprob if chosen is not None else None,
                        "bytes": list(text.encode()),
                        "top_logprobs": [{"token": e.decoded_token, "logprob": e.logprob,
                                          "bytes": list(e.decoded_token.encode())}
                                         for e in sorted(position.entries, key=lambda e: e.rank)]})
    return {"content": content}


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


def chat_usage_chunk(request_id: str, usage: common_pb2.Usage, model: str, created: int) -> dict[str, Any]:
    return {"id": chat_id(request_id), "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage_json(usage)}

"""OpenAI request bodies -> the router's ``GenerateRequest``, and its responses -> OpenAI JSON.

Only what this module can honour is accepted: a body with an unknown field, or a known one pdserve
does not implement (``n`` > 1, ``echo``, ``logit_bias``, ``suffix``, ...), is refused with
:class:`InvalidParameterError` naming the field, instead of being silently ignored. Range checks stay
where they are for every client (``SamplingParams`` validation, behind ``PdServeServicer.open_session``);
this module checks JSON types, so ``"max_tokens": "8"`` gets a type error naming ``max_tokens``.

Extensions accepted as vLLM accepts them: ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``, and a
prompt given as token ids.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pdserve.common.errors import InvalidParameterError
from pdserve.v1 import common_pb2, pdserve_pb2

_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_INTS = ("max_tokens", "min_tokens", "top_k", "seed")
_BOOLS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
#: Fields a client may send that change nothing in the generation (``user``) or only the framing.
_OTHER = ("user", "stream", "stream_options")
#: Fields of the OpenAI API pdserve does not implement: refused when set to anything but their default.
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logit_bias": None, "suffix": None}
COMPLETION_FIELDS = frozenset(("model", "prompt", "logprobs", "stop", "stop_token_ids", *_FLOATS, *_INTS, *_BOOLS,
                               *_OTHER, *_UNSUPPORTED))

FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                  common_pb2.FINISH_REASON_ABORT: "abort"}


def completion_request(body: Any, model: str) -> tuple[pdserve_pb2.GenerateRequest, bool, bool]:
    """``(GenerateRequest, stream, include_usage)`` for a ``/v1/completions`` body; raises
    :class:`InvalidParameterError` naming the offending field."""
    if not isinstance(body, Mapping):
        raise InvalidParameterError("body", "the request body must be a JSON object")
    unknown = sorted(set(body) - COMPLETION_FIELDS)
    if unknown:
        raise InvalidParameterError(unknown[0], f"unknown field {unknown[0]!r} (pdserve accepts "
                                                f"{', '.join(sorted(COMPLETION_FIELDS))})")
    for name, default in _UNSUPPORTED.items():
        value = body.get(name, default)
        if value is not None and value != default:
            raise InvalidParameterError(name, f"{name}={value!r} is not supported (only {default!r})")
    request = pdserve_pb2.GenerateRequest()
    requested_model = body.get("model")
    if requested_model is not None:
        if not isinstance(requested_model, str):
            raise InvalidParameterError("model", "must be a string")
        request.model = requested_model or model
    _set_prompt(request, body.get("prompt"))
    params = request.params
    for name in _FLOATS:
        if body.get(name) is not None:
            setattr(params, name, _number(body[name], name))
    for name in _INTS:
        if body.get(name) is not None:
            setattr(params, name, _integer(body[name], name))
    for name in _BOOLS:
        if body.get(name) is not None:
            if not isinstance(body[name], bool):
                raise InvalidParameterError(name, f"must be true or false, got {body[name]!r}")
            setattr(params, name, body[name])
    if body.get("logprobs") is not None:
        params.logprobs = _integer(body["logprobs"], "logprobs")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidParameterError("stop", "must be a string or a list of strings")
        params.stop.extend(stops)
    if body.get("stop_token_ids") is not None:
        ids = body["stop_token_ids"]
        if not isinstance(ids, list):
            raise InvalidParameterError("stop_token_ids", "must be a list of token ids")
        params.stop_token_ids.extend(_integer(i, "stop_token_ids") for i in ids)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidParameterError("stream", f"must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise InvalidParameterError("stream_options", "accepts {\"include_usage\": bool} only")
    if options and not stream:
        raise InvalidParameterError("stream_options", "is only allowed with stream=true")
    return request, stream, bool(options.get("include_usage", False))


def _set_prompt(request: pdserve_pb2.GenerateRequest, prompt: Any) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        request.token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidParameterError("prompt", "batched prompts are not supported: send one request per prompt")
    else:
        raise InvalidParameterError("prompt", "must be a string or a non-empty list of token ids")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameterError(name, f"must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(name, f"must be an integer, got {value!r}")
    return value


# -- responses -------------------------------------------------------------------------------------------

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
    finish = FINISH_REASONS.get(response.finish_reason) if response.finish_reason else None
    choice = {"index": 0, "text": response.text, "logprobs": completion_logprobs(response, text_offset),
              "finish_reason": finish}
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


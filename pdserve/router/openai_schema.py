"""OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``) -> the router's ``GenerateRequest``.

Only what this module can honour is accepted: a body with an unknown field, or a known one pdserve
does not implement (``n`` > 1, ``echo``, ``logit_bias``, ``suffix``, ...), is refused with
:class:`InvalidParameterError` naming the field, instead of being silently ignored. Range checks stay
where they are for every client (``SamplingParams`` validation, behind ``PdServeServicer.open_session``);
this module checks JSON types, so ``"max_tokens": "8"`` gets a type error naming ``max_tokens``.

Extensions accepted as vLLM accepts them: ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``, a
completion prompt given as token ids, and ``add_generation_prompt`` for chat. A chat message's
``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts (joined); the serving
worker renders the conversation with the model's chat template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pdserve.common.errors import InvalidParameterError
from pdserve.common.sampling_params import MAX_LOGPROBS
from pdserve.common.validation import require_text
from pdserve.rpc.convert import INT64_MAX, INT64_MIN
from pdserve.v1 import pdserve_pb2

_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_INTS = ("max_tokens", "min_tokens", "top_k", "seed")
_BOOLS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
#: Fields a client may send that change nothing in the generation (``user``) or only the framing.
_OTHER = ("user", "stream", "stream_options")
#: Fields of the OpenAI API pdserve does not implement: refused when set to anything but their default.
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logit_bias": None, "suffix": None}
_SAMPLING = ("stop", "stop_token_ids", *_FLOATS, *_INTS, *_BOOLS)
COMPLETION_FIELDS = frozenset(("model", "prompt", "logprobs", *_SAMPLING, *_OTHER, *_UNSUPPORTED))
_CHAT_UNSUPPORTED = {"n": 1, "logit_bias": None, "tools": None, "tool_choice": None, "functions": None,
                     "function_call": None, "audio": None, "modalities": None, "prediction": None}
CHAT_FIELDS = frozenset(("model", "messages", "logprobs", "top_logprobs", "max_completion_tokens",
                         "add_generation_prompt", "response_format", "parallel_tool_calls", *_SAMPLING, *_OTHER,
                         *_CHAT_UNSUPPORTED))


def completion_request(body: Any, model: str) -> tuple[pdserve_pb2.GenerateRequest, bool, bool]:
    """``(GenerateRequest, stream, include_usage)`` for a ``/v1/completions`` body; raises
    :class:`InvalidParameterError` naming the offending field."""
    request = _base_request(body, model, COMPLETION_FIELDS, _UNSUPPORTED)
    _set_prompt(request, body.get("prompt"))
    if body.get("logprobs") is not None:
        request.params.logprobs = _integer(body["logprobs"], "logprobs")
    return (request, *_framing(body))


def chat_request(body: Any, model: str, max_model_len: int = 0) -> tuple[pdserve_pb2.GenerateRequest, bool, bool]:
    """``(GenerateRequest, stream, include_usage)`` for a ``/v1/chat/completions`` body. Without
    ``max_tokens``/``max_completion_tokens`` a chat may fill the context: ``max_model_len`` (when known)."""
    request = _base_request(body, model, CHAT_FIELDS, _CHAT_UNSUPPORTED)
    format_type = (body.get("response_format") or {"type": "text"})
    if not isinstance(format_type, Mapping) or format_type.get("type") != "text":
        raise InvalidParameterError("response_format", "only {\"type\": \"text\"} is supported")
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise InvalidParameterError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        request.params.max_tokens = _integer(body["max_completion_tokens"], "max_completion_tokens")
    elif body.get("max_tokens") is None and max_model_len > 0:
        request.params.max_tokens = max_model_len  # the engine stops at the context's end first
    _flag(body, "parallel_tool_calls", True)  # type only: without tools it changes nothing
    if _flag(body, "logprobs", False):
        top = body.get("top_logprobs")
        request.params.logprobs = 0 if top is None else _integer(top, "top_logprobs")
        if not 0 <= request.params.logprobs <= MAX_LOGPROBS:
            raise InvalidParameterError("top_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {top}")
    elif body.get("top_logprobs") is not None:
        raise InvalidParameterError("top_logprobs", "needs logprobs=true")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", "must be a non-empty list of {role, content} objects")
    chat = request.chat
    chat.no_generation_prompt = not _flag(body, "add_generation_prompt", True)
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidParameterError(f"messages[{i}]", "must be an object with a string role")
        extra = sorted(set(message) - {"role", "content"} - {k for k, v in message.items() if v is None})
        if extra:
            raise InvalidParameterError(f"messages[{i}].{extra[0]}", "is not supported (a message is {role, "
                                                                     "content}; tool calls and names are not)")
        chat.messages.add(role=require_text(f"messages[{i}].role", message["role"]),
                          content=require_text(f"messages[{i}].content", _content(message.get("content"), i)))
    return (request, *_framing(body))


def _base_request(body: Any, model: str, accepted: frozenset[str],
                  unsupported: Mapping[str, Any]) -> pdserve_pb2.GenerateRequest:
    """The fields both endpoints share: field checks, model, sampling parameters."""
    if not isinstance(body, Mapping):
        raise InvalidParameterError("body", "the request body must be a JSON object")
    unknown = sorted(set(body) - accepted)
    if unknown:
        raise InvalidParameterError(unknown[0], f"unknown field {unknown[0]!r} (this endpoint accepts "
                                                f"{', '.join(sorted(accepted))})")
    for name, default in unsupported.items():
        value = body.get(name, default)
        if value is None or (default is None and value in ({}, [])):  # an empty logit_bias, tools, ...: none
            continue
        if type(value) is not type(default) or value != default:  # n: true is not n: 1
            raise InvalidParameterError(name, f"{name}={value!r} is not supported (only {default!r})")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise InvalidParameterError("user", f"must be a string, got {body['user']!r}")
    request = pdserve_pb2.GenerateRequest()
    requested_model = body.get("model")
    if requested_model is not None:
        if not isinstance(requested_model, str):
            raise InvalidParameterError("model", "must be a string")
        request.model = require_text("model", requested_model) or model
    params = request.params
    for name in _FLOATS:
        if body.get(name) is not None:
            setattr(params, name, _number(body[name], name))
    for name in _INTS:
        if body.get(name) is not None:
            setattr(params, name, _integer(body[name], name))
    for name in _BOOLS:
        if body.get(name) is not None:
            setattr(params, name, _flag(body, name, False))
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidParameterError("stop", "must be a string or a list of strings")
        params.stop.extend(require_text("stop", s) for s in stops)
    if body.get("stop_token_ids") is not None:
        ids = body["stop_token_ids"]
        if not isinstance(ids, list):
            raise InvalidParameterError("stop_token_ids", "must be a list of token ids")
        params.stop_token_ids.extend(_integer(i, "stop_token_ids") for i in ids)
    return request


def _framing(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(stream, include_usage)``."""
    stream = _flag(body, "stream", False)
    options = body.get("stream_options") or {}
    if (not isinstance(options, Mapping) or set(options) - {"include_usage", "continuous_usage_stats"}
            or not all(isinstance(v, bool) for v in options.values())):
        raise InvalidParameterError("stream_options", "accepts {\"include_usage\": bool} only")
    if options and not stream:
        raise InvalidParameterError("stream_options", "is only allowed with stream=true")
    return stream, bool(options.get("include_usage", False))


def _content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidParameterError(f"messages[{index}].content", "must be a string or a list of text parts "
                                                              "(images and audio are not supported)")


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidParameterError(name, f"must be true or false, got {value!r}")
    return value


def _set_prompt(request: pdserve_pb2.GenerateRequest, prompt: Any) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.text = require_text("prompt", prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        request.token_ids.ids.extend(_integer(t, "prompt") for t in prompt)
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
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidParameterError(name, f"must fit in a signed 64-bit integer, got {value}")
    return value

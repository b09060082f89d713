"""Conversions of the ``PdServe`` service's requests and of its ListModels / ClusterStatus replies.

``GenerateResponse`` helpers are in :mod:`pdserve.rpc.convert` (next to the delta conversions they use).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pdserve.common.errors import InvalidParameterError
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.validation import require_text
from pdserve.rpc.convert import sampling_params_to_proto, token_ids_to_proto
from pdserve.rpc.types import ClusterStatus, ModelInfo, PlannedConfiguration, PlannerStatus, WorkerStatus
from pdserve.v1 import common_pb2, pdserve_pb2

#: The longest request id a caller may choose (ids are logged, keyed on and sent to every worker).
MAX_REQUEST_ID_CHARS = 256


#: The roles a chat message may have (what the models' chat templates render).
CHAT_ROLES = ("system", "user", "assistant")


def require_request_id(value: object) -> str:
    """A caller's request id: UTF-8 text of at most ``MAX_REQUEST_ID_CHARS`` characters and no control
    characters (ids are written to logs, where a newline would forge a line); else InvalidParameterError."""
    text = require_text("request_id", value, max_chars=MAX_REQUEST_ID_CHARS)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InvalidParameterError("request_id", f"must not contain control characters, got {bad!r} at "
                                                  f"character {text.index(bad)}")
    return text


def generate_request(
    prompt: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    params: SamplingParams | Mapping[str, Any] | None = None,
    *,
    request_id: str = "",
    model: str = "",
    messages: Sequence[Mapping[str, str]] | None = None,
) -> pdserve_pb2.GenerateRequest:
    """A ``GenerateRequest`` for exactly one of a prompt text, prompt token ids or chat ``messages``
    (``{"role", "content"}`` mappings of strings; a generation prompt is added after them).

    ``params`` may be validated :class:`SamplingParams` or a dict sent unvalidated (see
    :func:`~pdserve.rpc.convert.sampling_params_to_proto`). Raises :class:`InvalidParameterError`
    naming the field: ``prompt`` when both or neither prompt form is given or the text is not a
    string, ``prompt_token_ids`` for non-integer ids, a sampling field the wire cannot carry.
    """
    if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
        raise InvalidParameterError("prompt", "pass exactly one of a prompt text, prompt_token_ids or messages")
    request = pdserve_pb2.GenerateRequest(request_id=require_request_id(request_id),
                                          model=require_text("model", model), params=sampling_params_to_proto(params))
    if messages is not None:
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
                raise InvalidParameterError(f"messages[{i}]", "must be a mapping with string role and content")
            request.chat.messages.add(role=require_text(f"messages[{i}].role", message["role"]),
                                      content=require_text(f"messages[{i}].content", message["content"]))
    elif prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidParameterError("prompt", f"must be a string, got {type(prompt).__name__}")
        request.text = require_text("prompt", prompt)
    else:
        request.token_ids.CopyFrom(token_ids_to_proto(prompt_token_ids or ()))
    return request


def prompt_from_request(request: pdserve_pb2.GenerateRequest) -> str | list[int] | common_pb2.ChatPrompt:
    """The prompt of a request: its text, its token ids, or its chat (checked: at least one message, each
    with one of ``CHAT_ROLES``). Raises InvalidParameterError if it has none or the chat is malformed."""
    which = request.WhichOneof("prompt")
    if which == "text":
        return request.text
    if which == "token_ids":
        return list(request.token_ids.ids)
    if which == "chat":
        if not request.chat.messages:
            raise InvalidParameterError("messages", "the conversation has no message")
        for i, message in enumerate(request.chat.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidParameterError(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got "
                                                                   f"{message.role!r}")
        return request.chat
    raise InvalidParameterError("prompt", "the request has no prompt: set text, token_ids or chat")


def model_info_to_proto(info: ModelInfo) -> pdserve_pb2.ModelInfo:
    return pdserve_pb2.ModelInfo(name=info.name, max_model_len=info.max_model_len, vocab_size=info.vocab_size)


def model_info_from_proto(msg: pdserve_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(name=msg.name, max_model_len=msg.max_model_len, vocab_size=msg.vocab_size)


def list_models_response(models: Iterable[ModelInfo]) -> pdserve_pb2.ListModelsResponse:
    return pdserve_pb2.ListModelsResponse(models=[model_info_to_proto(m) for m in models])


def models_from_proto(msg: pdserve_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [model_info_from_proto(m) for m in msg.models]


def worker_status_to_proto(worker: WorkerStatus) -> pdserve_pb2.WorkerStatus:
    return pdserve_pb2.WorkerStatus(
        worker_id=worker.worker_id, role=worker.role, address=worker.address, healthy=worker.healthy,
        running_requests=worker.running_requests, waiting_requests=worker.waiting_requests,
        kv_usage=worker.kv_usage, queued_prefill_tokens=worker.queued_prefill_tokens,
        num_kv_blocks=worker.num_kv_blocks, restarts=worker.restarts, last_recovery_s=worker.last_recovery_s,
        loop_lag_s=worker.loop_lag_s)


def worker_status_from_proto(msg: pdserve_pb2.WorkerStatus) -> WorkerStatus:
    return WorkerStatus(
        worker_id=msg.worker_id, role=msg.role, address=msg.address, healthy=msg.healthy,
        running_requests=msg.running_requests, waiting_requests=msg.waiting_requests, kv_usage=msg.kv_usage,
        queued_prefill_tokens=msg.queued_prefill_tokens, num_kv_blocks=msg.num_kv_blocks, restarts=msg.restarts,
        last_recovery_s=msg.last_recovery_s, loop_lag_s=msg.loop_lag_s)


def planner_status_to_proto(planner: PlannerStatus) -> pdserve_pb2.PlannerStatus:
    return pdserve_pb2.PlannerStatus(
        mode=planner.mode, status=planner.status, recommended=planner.recommended, current=planner.current,
        planned_at=planner.planned_at, apply_status=planner.apply_status,
        predictions=[pdserve_pb2.PlannedConfiguration(
            config=p.config, goodput_per_gpu=p.goodput_per_gpu, attainment_at_offered=p.attainment_at_offered,
            preemptions_per_request=p.preemptions_per_request) for p in planner.predictions])


def planner_status_from_proto(msg: pdserve_pb2.PlannerStatus) -> PlannerStatus:
    return PlannerStatus(
        mode=msg.mode, status=msg.status, recommended=msg.recommended, current=msg.current,
        planned_at=msg.planned_at, apply_status=msg.apply_status,
        predictions=tuple(PlannedConfiguration(config=p.config, goodput_per_gpu=p.goodput_per_gpu,
                                               attainment_at_offered=p.attainment_at_offered,
                                               preemptions_per_request=p.preemptions_per_request)
                          for p in msg.predictions))


def cluster_status_to_proto(status: ClusterStatus) -> pdserve_pb2.ClusterStatusResponse:
    return pdserve_pb2.ClusterStatusResponse(
        mode=status.mode, model=status.model, workers=[worker_status_to_proto(w) for w in status.workers],
        requests_in_flight=status.requests_in_flight, router_loop_lag_s=status.router_loop_lag_s,
        router_gc_pause_s=status.router_gc_pause_s,
        planner=planner_status_to_proto(status.planner) if status.planner is not None else None)


def cluster_status_from_proto(msg: pdserve_pb2.ClusterStatusResponse) -> ClusterStatus:
    return ClusterStatus(mode=msg.mode, model=msg.model,
                         workers=tuple(worker_status_from_proto(w) for w in msg.workers),
                         requests_in_flight=msg.requests_in_flight, router_loop_lag_s=msg.router_loop_lag_s,
                         router_gc_pause_s=msg.router_gc_pause_s,
                         planner=planner_status_from_proto(msg.planner) if msg.HasField("planner") else None)

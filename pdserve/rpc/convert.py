"""Conversions between ``pdserve.v1`` proto messages and pdserve's dataclasses: the only place that does them.

Contracts, both directions:

* Sampling parameters: a proto field left unset means "pdserve's default". Decoding validates
  (:class:`SamplingParams` does), so a bad value raises :class:`InvalidParameterError` naming the
  field; encoding does not validate ranges (a client sends what its caller gave, the server judges),
  it only rejects values the wire cannot carry (wrong type, beyond int64), also naming the field.
* Finish reasons: ``None`` (not finished) <-> ``FINISH_REASON_UNSPECIFIED``.
* Stop reasons: a ``str`` <-> ``stop_string``, an ``int`` <-> ``stop_token_id``, ``None`` <-> neither.
* Logprobs: one :class:`PositionLogprobs` per generated position, its entries in the dict's order;
  an empty ``decoded_token`` decodes to ``None``, and an empty logprob list to ``None``.
* Texts and errors: ``""`` decodes to ``None`` where the dataclass field is optional (``error``).
* ``GenerateResponse``: servers build them from deltas with :class:`ResponseAssembler`; clients read
  them with :func:`chunk_from_response` / :func:`completion_from_response`.

``GenerateRequest``, ``ListModels`` and ``ClusterStatus`` messages are converted in :mod:`pdserve.rpc.api`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from pdserve.common.errors import InvalidParameterError
from pdserve.common.outputs import FinishReason, Logprob, RequestDelta, TokenLogprobs
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.validation import require_text
from pdserve.rpc.types import Completion, CompletionChunk, Usage
from pdserve.v1 import common_pb2, pdserve_pb2

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Proto field kinds of SamplingParams; tests check that these cover the proto and the dataclass exactly.
_INT_FIELDS = frozenset({"max_tokens", "min_tokens", "top_k", "seed", "logprobs"})
_FLOAT_FIELDS = frozenset({"temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                           "presence_penalty"})
_OPTIONAL_BOOL_FIELDS = frozenset({"skip_special_tokens"})
_PLAIN_BOOL_FIELDS = frozenset({"include_stop_str_in_output", "ignore_eos"})  # proto3 default = ours
_REPEATED_FIELDS = frozenset({"stop", "stop_token_ids"})
SAMPLING_FIELDS = _INT_FIELDS | _FLOAT_FIELDS | _OPTIONAL_BOOL_FIELDS | _PLAIN_BOOL_FIELDS | _REPEATED_FIELDS
"""The names of every sampling parameter the wire carries (= SamplingParams' field names)."""

_FINISH_TO_PROTO: dict[FinishReason | None, common_pb2.FinishReason] = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_FINISH_FROM_PROTO: dict[int, FinishReason | None] = {v: k for k, v in _FINISH_TO_PROTO.items()}


# ----------------------------------------------------------------------------------- sampling parameters


def sampling_params_from_proto(msg: common_pb2.SamplingParams | None) -> SamplingParams:
    """The validated :class:`SamplingParams` of ``msg``; unset optional fields keep their defaults.

    ``None`` (an absent message) gives the defaults. Raises :class:`InvalidParameterError` naming the
    field when a value is out of range.
    """
    if msg is None:
        return SamplingParams()
    kwargs: dict[str, Any] = {}
    for name in _INT_FIELDS | _FLOAT_FIELDS | _OPTIONAL_BOOL_FIELDS:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    for name in _PLAIN_BOOL_FIELDS:
        kwargs[name] = getattr(msg, name)
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    return SamplingParams(**kwargs)


def sampling_params_to_proto(params: SamplingParams | Mapping[str, Any] | None) -> common_pb2.SamplingParams:
    """Encode validated params, or a plain dict of SamplingParams keyword arguments sent unvalidated.

    In a dict, ``None`` leaves a field unset (the server's default applies), ``stop`` may be one string,
    and ranges are not checked. Raises :class:`InvalidParameterError` naming the field for an unknown
    name or a value the wire cannot carry (a string for a number, 1.5 for an integer, a number beyond
    int64, a non-bool for a flag).
    """
    msg = common_pb2.SamplingParams()
    if params is None:
        return msg
    values = params.to_dict() if isinstance(params, SamplingParams) else dict(params)
    for name, value in values.items():
        if name not in SAMPLING_FIELDS:
            raise InvalidParameterError(
                name, f"unknown sampling parameter; expected one of {', '.join(sorted(SAMPLING_FIELDS))}")
        if value is None:
            continue
        if name == "stop":
            msg.stop.extend(_encode_stop(value))
        elif name == "stop_token_ids":
            msg.stop_token_ids.extend(_encode_ints(name, value))
        elif name in _INT_FIELDS:
            setattr(msg, name, _encode_int(name, value))
        elif name in _FLOAT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidParameterError(name, f"must be a number, got {value!r}")
            setattr(msg, name, float(value))
        else:
            if not isinstance(value, bool):
                raise InvalidParameterError(name, f"must be true or false, got {value!r}")
            setattr(msg, name, value)
    return msg


def _encode_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(name, f"must be an integer, got {value!r}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidParameterError(name, f"must fit in a signed 64-bit integer, got {value}")
    return value


def _encode_ints(name: str, values: Any) -> list[int]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise InvalidParameterError(name, f"must be a list of integers, got {values!r}")
    return [_encode_int(name, v) for v in values]


def _encode_stop(value: Any) -> list[str]:
    if isinstance(value, str):
        return [require_text("stop", value)]
    if not isinstance(value, Iterable) or isinstance(value, bytes):
        raise InvalidParameterError("stop", f"must be a string or a list of strings, got {value!r}")
    out = list(value)
    for s in out:
        if not isinstance(s, str):
            raise InvalidParameterError("stop", f"each stop string must be a non-empty string, got {s!r}")
        require_text("stop", s)
    return out


# ----------------------------------------------------------------------- finish reasons, stop reasons


def finish_reason_to_proto(reason: FinishReason | str | None) -> common_pb2.FinishReason:
    """The ``FinishReason`` enum value of ``reason``; ``None`` (not finished) is ``UNSPECIFIED``."""
    return _FINISH_TO_PROTO[None if reason is None else FinishReason(reason)]


def finish_reason_from_proto(value: int) -> FinishReason | None:
    """The :class:`FinishReason` of an enum value; ``UNSPECIFIED`` is ``None``. Unknown values: ValueError."""
    try:
        return _FINISH_FROM_PROTO[value]
    except KeyError:
        raise ValueError(f"unknown FinishReason enum value {value}") from None


class _HasStopReason(Protocol):
    stop_string: str
    stop_token_id: int

    def WhichOneof(self, oneof_group: str) -> str | None: ...  # noqa: N802 (protobuf's name)


def set_stop_reason(msg: _HasStopReason, reason: str | int | None) -> None:
    """Set the ``stop_reason`` oneof of a ``RequestDelta`` or ``GenerateResponse`` (None: leave unset)."""
    if reason is None:
        return
    if isinstance(reason, str):
        msg.stop_string = reason
    elif isinstance(reason, int) and not isinstance(reason, bool):
        msg.stop_token_id = reason
    else:
        raise TypeError(f"a stop reason is a stop string or a stop token id, got {reason!r}")


def stop_reason_from_proto(msg: _HasStopReason) -> str | int | None:
    """The stop string, stop token id or ``None`` held by a message's ``stop_reason`` oneof."""
    which = msg.WhichOneof("stop_reason")
    if which == "stop_string":
        return msg.stop_string
    if which == "stop_token_id":
        return msg.stop_token_id
    return None


# --------------------------------------------------------------------------------------------- logprobs


def position_logprobs_to_proto(position: TokenLogprobs) -> common_pb2.PositionLogprobs:
    """One position's token id -> Logprob dict as a ``PositionLogprobs`` (entries in the dict's order)."""
    return common_pb2.PositionLogprobs(entries=[
        common_pb2.Logprob(token_id=token_id, logprob=lp.logprob, rank=lp.rank,
                           decoded_token=lp.decoded_token or "")
        for token_id, lp in position.items()
    ])


def position_logprobs_from_proto(msg: common_pb2.PositionLogprobs) -> TokenLogprobs:
    """The token id -> :class:`Logprob` dict of one position (an empty decoded token becomes ``None``)."""
    return {e.token_id: Logprob(logprob=e.logprob, rank=e.rank, decoded_token=e.decoded_token or None)
            for e in msg.entries}


def logprobs_to_proto(logprobs: Sequence[TokenLogprobs] | None) -> list[common_pb2.PositionLogprobs]:
    """Per-position logprobs as proto messages; ``None`` gives an empty list."""
    return [position_logprobs_to_proto(p) for p in logprobs or ()]


def logprobs_from_proto(msgs: Iterable[common_pb2.PositionLogprobs]) -> list[TokenLogprobs] | None:
    """Per-position logprob dicts; an empty sequence gives ``None`` (no logprobs)."""
    out = [position_logprobs_from_proto(m) for m in msgs]
    return out or None


# ------------------------------------------------------------------------------------- deltas, usage


def delta_to_proto(delta: RequestDelta) -> common_pb2.RequestDelta:
    """A :class:`RequestDelta` as its proto mirror (``error=None`` is sent as ``""``)."""
    msg = common_pb2.RequestDelta(
        request_id=delta.request_id,
        new_token_ids=delta.new_token_ids,
        new_text=delta.new_text,
        new_logprobs=logprobs_to_proto(delta.new_logprobs),
        finished=delta.finished,
        finish_reason=finish_reason_to_proto(delta.finish_reason),
        num_prompt_tokens=delta.num_prompt_tokens,
        num_cached_tokens=delta.num_cached_tokens,
        error=delta.error or "",
        error_code=delta.error_code or "",
    )
    set_stop_reason(msg, delta.stop_reason)
    return msg


def delta_from_proto(msg: common_pb2.RequestDelta) -> RequestDelta:
    """The :class:`RequestDelta` of a proto message (no logprobs -> ``None``, ``error=""`` -> ``None``)."""
    return RequestDelta(
        request_id=msg.request_id,
        new_token_ids=list(msg.new_token_ids),
        new_text=msg.new_text,
        new_logprobs=logprobs_from_proto(msg.new_logprobs),
        finished=msg.finished,
        finish_reason=finish_reason_from_proto(msg.finish_reason),
        stop_reason=stop_reason_from_proto(msg),
        num_prompt_tokens=msg.num_prompt_tokens,
        num_cached_tokens=msg.num_cached_tokens,
        error=msg.error or None,
        error_code=msg.error_code or None,
    )


def usage_to_proto(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                            cached_prompt_tokens=usage.cached_prompt_tokens)


def usage_from_proto(msg: common_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=msg.prompt_tokens, completion_tokens=msg.completion_tokens,
                 cached_prompt_tokens=msg.cached_prompt_tokens)


def token_ids_to_proto(ids: Iterable[int], *, field: str = "prompt_token_ids") -> common_pb2.TokenIds:
    """A ``TokenIds`` message. Raises :class:`InvalidParameterError` naming ``field`` for non-int64 values."""
    return common_pb2.TokenIds(ids=_encode_ints(field, ids))


def token_ids_from_proto(msg: common_pb2.TokenIds) -> list[int]:
    return list(msg.ids)


# ----------------------------------------------------------------------------------- GenerateResponse


class ResponseAssembler:
    """Server side: turns one request's :class:`RequestDelta` stream into ``GenerateResponse`` messages.

    :meth:`add` returns the streaming response of each delta (new tokens and text only; the response of
    the finishing delta has ``finish_reason`` and ``usage``) and accumulates everything, so that
    :meth:`unary_response` can answer ``GenerateUnary`` once :attr:`finished`. Responses carry
    ``request_id`` when given (the id the client knows), else each delta's own id.

    A delta whose ``finish_reason`` is ``ERROR`` is converted like any other; a servicer should rather
    fail the call (:func:`pdserve.rpc.status.abort_with`) with the delta's ``error``.
    """

    def __init__(self, request_id: str | None = None) -> None:
        self._request_id = request_id
        self._token_ids: list[int] = []
        self._texts: list[str] = []
        self._logprobs: list[common_pb2.PositionLogprobs] = []
        self._finish_reason: FinishReason | None = None
        self._stop_reason: str | int | None = None
        self._num_prompt_tokens = 0
        self._num_cached_tokens = 0
        self._finished = False
        self._seen_id = ""

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def num_completion_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def token_ids(self) -> list[int]:
        """The output token ids received so far (a copy)."""
        return list(self._token_ids)

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=self._num_prompt_tokens, completion_tokens=len(self._token_ids),
                     cached_prompt_tokens=self._num_cached_tokens)

    def add(self, delta: RequestDelta) -> pdserve_pb2.GenerateResponse:
        """Record ``delta`` and return its streaming response. Raises ValueError after the finishing delta."""
        return self.add_proto(delta_to_proto(delta))

    def add_proto(self, delta: common_pb2.RequestDelta) -> pdserve_pb2.GenerateResponse:
        """:meth:`add` of a delta as it arrived from a worker (see :meth:`add_protos`)."""
        return self.add_protos((delta,))

    def add_protos(self, deltas: Sequence[common_pb2.RequestDelta]) -> pdserve_pb2.GenerateResponse:
        """Record ``deltas`` (in order, as they arrived from a worker) and return ONE streaming response
        carrying them all: their tokens, text and logprobs concatenated, and the finish reason, stop
        reason and usage if the last finishes the request. Fields are copied message to message with no
        Python objects in between and one response per call, not per delta: the router's per-token path,
        where several deltas of a stream that waited (paced writes, a slow client) leave as one write.
        Raises ValueError for no deltas, or a delta after the finishing one."""
        if not deltas:
            raise ValueError("add_protos needs at least one delta")
        response = pdserve_pb2.GenerateResponse(request_id=self._request_id or deltas[0].request_id)
        texts = []
        for delta in deltas:
            if self._finished:
                raise ValueError(f"request {delta.request_id!r}: a delta arrived after the request finished")
            self._seen_id = self._seen_id or delta.request_id
            self._token_ids.extend(delta.new_token_ids)
            self._texts.append(delta.new_text)
            self._logprobs.extend(delta.new_logprobs)
            self._num_prompt_tokens = delta.num_prompt_tokens or self._num_prompt_tokens
            self._num_cached_tokens = delta.num_cached_tokens or self._num_cached_tokens
            response.token_ids.extend(delta.new_token_ids)
            texts.append(delta.new_text)
            response.logprobs.extend(delta.new_logprobs)
            if delta.finished:
                self._finished = True
                reason = finish_reason_from_proto(delta.finish_reason) or FinishReason.STOP  # finished implies a reason
                self._finish_reason = reason
                self._stop_reason = stop_reason_from_proto(delta)
                response.finish_reason = finish_reason_to_proto(reason)
                set_stop_reason(response, self._stop_reason)
                response.usage.CopyFrom(usage_to_proto(self.usage))
        response.text = texts[0] if len(texts) == 1 else "".join(texts)
        return response

    def unary_response(self) -> pdserve_pb2.GenerateResponse:
        """Everything accumulated so far as one response, with usage (finish reason unset if unfinished)."""
        response = pdserve_pb2.GenerateResponse(
            request_id=self._request_id or self._seen_id, token_ids=self._token_ids,
            text="".join(self._texts),
            logprobs=self._logprobs, finish_reason=finish_reason_to_proto(self._finish_reason),
            usage=usage_to_proto(self.usage))
        set_stop_reason(response, self._stop_reason)
        return response


def chunk_from_response(msg: pdserve_pb2.GenerateResponse) -> CompletionChunk:
    """Client side: one streamed response as a :class:`CompletionChunk` (usage only if the message has it)."""
    return CompletionChunk(
        request_id=msg.request_id, text=msg.text, token_ids=list(msg.token_ids),
        logprobs=logprobs_from_proto(msg.logprobs), finish_reason=finish_reason_from_proto(msg.finish_reason),
        stop_reason=stop_reason_from_proto(msg),
        usage=usage_from_proto(msg.usage) if msg.HasField("usage") else None)


def completion_from_response(msg: pdserve_pb2.GenerateResponse) -> Completion:
    """Client side: a ``GenerateUnary`` response as a :class:`Completion` (no usage: counts the tokens)."""
    token_ids = list(msg.token_ids)
    usage = usage_from_proto(msg.usage) if msg.HasField("usage") else Usage(completion_tokens=len(token_ids))
    return Completion(
        request_id=msg.request_id, text=msg.text, token_ids=token_ids,
        finish_reason=finish_reason_from_proto(msg.finish_reason), usage=usage,
        stop_reason=stop_reason_from_proto(msg), logprobs=logprobs_from_proto(msg.logprobs))

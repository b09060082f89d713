"""pdserve.rpc: proto <-> dataclass conversions round-trip, defaults hold, bad values name their field,
and exceptions map to the documented gRPC status codes."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import math
from pathlib import Path
from typing import Any

import grpc
import pytest

from pdserve.common.errors import (
    ConfigError,
    InvalidParameterError,
    ModelLoadError,
    OutOfCapacityError,
    PromptTooLongError,
)
from pdserve.common.outputs import FinishReason, Logprob, RequestDelta
from pdserve.common.sampling_params import SamplingParams
from pdserve.rpc import api, convert, options, status
from pdserve.rpc.server import format_address
from pdserve.rpc.types import (
    ClusterStatus,
    Completion,
    ModelInfo,
    PlannedConfiguration,
    PlannerStatus,
    Usage,
    WorkerStatus,
)
from pdserve.v1 import common_pb2, pdserve_pb2

# ------------------------------------------------------------------------------------ sampling params


def test_sampling_fields_match_the_proto_and_the_dataclass() -> None:
    proto = {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}
    ours = {f.name for f in dataclasses.fields(SamplingParams)}
    assert proto == ours == convert.SAMPLING_FIELDS


def test_unset_fields_give_the_defaults() -> None:
    assert convert.sampling_params_from_proto(common_pb2.SamplingParams()) == SamplingParams()
    assert convert.sampling_params_from_proto(None) == SamplingParams()
    only = convert.sampling_params_from_proto(common_pb2.SamplingParams(top_p=0.5, seed=0))
    assert only == SamplingParams(top_p=0.5, seed=0)  # seed=0 is set, not "unset"
    assert convert.sampling_params_to_proto(None) == common_pb2.SamplingParams()


def test_sampling_params_round_trip() -> None:
    params = SamplingParams(max_tokens=7, min_tokens=2, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05,
                            repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=-0.5, seed=42,
                            stop=("END", "\n\n"), stop_token_ids=(2, 7), include_stop_str_in_output=True,
                            ignore_eos=True, logprobs=3, skip_special_tokens=False)
    msg = convert.sampling_params_to_proto(params)
    assert convert.sampling_params_from_proto(msg) == params
    assert convert.sampling_params_from_proto(convert.sampling_params_to_proto(SamplingParams())) == SamplingParams()
    wire = common_pb2.SamplingParams.FromString(msg.SerializeToString())
    assert convert.sampling_params_from_proto(wire) == params


def test_a_dict_is_sent_unvalidated_and_the_decoder_validates() -> None:
    msg = convert.sampling_params_to_proto({"top_p": 1.5, "stop": "abc", "seed": None, "temperature": 1})
    assert msg.top_p == 1.5 and list(msg.stop) == ["abc"] and not msg.HasField("seed") and msg.temperature == 1.0
    with pytest.raises(InvalidParameterError) as info:
        convert.sampling_params_from_proto(msg)
    assert info.value.field == "top_p"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"frequency_penalty": 3.0}, "frequency_penalty"),
])
def test_invalid_values_raise_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    msg = convert.sampling_params_to_proto(kwargs)
    with pytest.raises(InvalidParameterError) as info:
        convert.sampling_params_from_proto(msg)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"seed": 2**64}, "seed"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"skip_special_tokens": "no"}, "skip_special_tokens"),
    ({"stop_token_ids": "12"}, "stop_token_ids"),
    ({"stop": [1]}, "stop"),
    ({"top_pp": 0.5}, "top_pp"),
])
def test_values_the_wire_cannot_carry_raise_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        convert.sampling_params_to_proto(kwargs)
    assert info.value.field == field


# ------------------------------------------------------------------------ finish reasons, logprobs, deltas


@pytest.mark.parametrize("reason", [None, *FinishReason])
def test_finish_reason_round_trip(reason: FinishReason | None) -> None:
    value = convert.finish_reason_to_proto(reason)
    assert convert.finish_reason_from_proto(value) == reason
    assert (value == common_pb2.FINISH_REASON_UNSPECIFIED) == (reason is None)


def test_finish_reason_edges() -> None:
    assert convert.finish_reason_to_proto("length") == common_pb2.FINISH_REASON_LENGTH
    with pytest.raises(ValueError, match="unknown FinishReason"):
        convert.finish_reason_from_proto(99)


def _delta(**overrides: Any) -> RequestDelta:
    base: dict[str, Any] = dict(
        request_id="r1", new_token_ids=[5, 6], new_text="ab",
        new_logprobs=[{5: Logprob(-0.1, 1, "a"), 9: Logprob(-2.5, 2, None)}, {6: Logprob(-0.2, 1, "b")}],
        finished=True, finish_reason=FinishReason.STOP, stop_reason="END", num_prompt_tokens=4,
        num_cached_tokens=2, error=None)
    base.update(overrides)
    return RequestDelta(**base)


@pytest.mark.parametrize("delta", [
    _delta(),
    _delta(stop_reason=7),
    _delta(stop_reason=None, finish_reason=FinishReason.LENGTH),
    _delta(stop_reason=""),  # an empty stop string is still "a stop string"
    _delta(finished=False, finish_reason=None, stop_reason=None, new_logprobs=None),
    _delta(finish_reason=FinishReason.ERROR, stop_reason=None, error="worker lost"),
    _delta(new_token_ids=[], new_text="", new_logprobs=None, finished=False, finish_reason=None, stop_reason=None),
], ids=["stop-string", "stop-token", "length", "empty-stop-string", "unfinished", "error", "empty"])
def test_delta_round_trip(delta: RequestDelta) -> None:
    msg = convert.delta_to_proto(delta)
    wire = common_pb2.RequestDelta.FromString(msg.SerializeToString())
    assert convert.delta_from_proto(wire) == delta


def test_delta_stop_reason_oneof_and_logprob_order() -> None:
    msg = convert.delta_to_proto(_delta(stop_reason=7))
    assert msg.WhichOneof("stop_reason") == "stop_token_id"
    assert [e.token_id for e in msg.new_logprobs[0].entries] == [5, 9]
    assert msg.new_logprobs[0].entries[1].decoded_token == ""  # None travels as ""
    with pytest.raises(TypeError):
        convert.delta_to_proto(_delta(stop_reason=True))


def test_usage_and_token_ids_round_trip() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, cached_prompt_tokens=1)
    assert convert.usage_from_proto(convert.usage_to_proto(usage)) == usage and usage.total_tokens == 7
    assert convert.token_ids_from_proto(convert.token_ids_to_proto([1, 2, 3])) == [1, 2, 3]
    with pytest.raises(InvalidParameterError) as info:
        convert.token_ids_to_proto([1, "2"])  # type: ignore[list-item]
    assert info.value.field == "prompt_token_ids"


# --------------------------------------------------------------------------- GenerateRequest / Response


def test_generate_request_round_trip() -> None:
    req = api.generate_request("Hello", params={"max_tokens": 3}, request_id="x", model="m")
    wire = pdserve_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert api.prompt_from_request(wire) == "Hello" and wire.request_id == "x" and wire.model == "m"
    assert convert.sampling_params_from_proto(wire.params) == SamplingParams(max_tokens=3)
    req = api.generate_request(prompt_token_ids=[4, 5], params=SamplingParams(seed=1))
    assert api.prompt_from_request(req) == [4, 5]
    assert convert.sampling_params_from_proto(req.params) == SamplingParams(seed=1)
    assert api.prompt_from_request(api.generate_request("")) == ""  # an empty text is a (bad) prompt, not none


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"prompt": "a\ud800"}, "prompt"),
    ({"messages": [{"role": "user", "content": "\udc00"}]}, "messages[0].content"),
    ({"prompt": "x", "params": {"stop": ["ok", "\ud83d"]}}, "stop"),
    ({"prompt": "x", "request_id": "r" * 257}, "request_id"),
    ({"prompt": "x", "params": {"seed": 2**64}}, "seed"),
])
def test_generate_request_refuses_what_the_wire_cannot_carry(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        api.generate_request(**kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("kwargs", [{}, {"prompt": "a", "prompt_token_ids": [1]}, {"prompt": b"bytes"}])
def test_generate_request_needs_exactly_one_prompt(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameterError) as info:
        api.generate_request(**kwargs)
    assert info.value.field == "prompt"


def test_a_request_without_prompt_is_invalid() -> None:
    with pytest.raises(InvalidParameterError) as info:
        api.prompt_from_request(pdserve_pb2.GenerateRequest())
    assert info.value.field == "prompt"


def _deltas() -> list[RequestDelta]:
    lp = {5: Logprob(-0.1, 1, "a")}
    return [
        RequestDelta("eng-1", [5], "a", [lp], num_prompt_tokens=4, num_cached_tokens=2),
        RequestDelta("eng-1", [5, 5], "aa", [lp, lp]),
        RequestDelta("eng-1", [7], "", [{7: Logprob(-0.3, 1, "")}], finished=True, finish_reason=FinishReason.STOP,
                     stop_reason=7, num_prompt_tokens=4, num_cached_tokens=2),
    ]


def test_streamed_responses_fold_into_the_unary_response() -> None:
    assembler = convert.ResponseAssembler("public-id")
    responses = [assembler.add(d) for d in _deltas()]
    assert assembler.finished and assembler.num_completion_tokens == 4
    assert [r.HasField("usage") for r in responses] == [False, False, True]
    assert [r.finish_reason for r in responses[:2]] == [common_pb2.FINISH_REASON_UNSPECIFIED] * 2
    chunks = [convert.chunk_from_response(pdserve_pb2.GenerateResponse.FromString(r.SerializeToString()))
              for r in responses]
    assert [c.request_id for c in chunks] == ["public-id"] * 3
    assert [c.finished for c in chunks] == [False, False, True]
    streamed = Completion.from_chunks(chunks)
    unary = convert.completion_from_response(assembler.unary_response())
    assert streamed == unary
    assert unary.text == "aaa" and unary.token_ids == [5, 5, 5, 7] and unary.stop_reason == 7
    assert unary.finish_reason is FinishReason.STOP
    assert unary.usage == Usage(prompt_tokens=4, completion_tokens=4, cached_prompt_tokens=2)
    assert unary.logprobs is not None and len(unary.logprobs) == 4 and unary.logprobs[3][7].decoded_token is None
    with pytest.raises(ValueError, match="after the request finished"):
        assembler.add(_deltas()[0])


def test_assembler_defaults_to_the_delta_request_id_and_unfinished_unary() -> None:
    assembler = convert.ResponseAssembler()
    assembler.add(_deltas()[0])
    response = assembler.unary_response()
    assert response.request_id == "eng-1" and response.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    assert convert.completion_from_response(pdserve_pb2.GenerateResponse(token_ids=[1, 2])).usage.completion_tokens == 2


def test_models_and_cluster_status_round_trip() -> None:
    models = [ModelInfo("tiny", 128, 256), ModelInfo("other")]
    wire = pdserve_pb2.ListModelsResponse.FromString(api.list_models_response(models).SerializeToString())
    assert api.models_from_proto(wire) == models
    status_ = ClusterStatus(mode="disaggregated", model="tiny", requests_in_flight=3, workers=(
        WorkerStatus("p0", "prefill", "h:1", True, 1, 2, 0.25, 100, 64),
        WorkerStatus("d0", "decode", "h:2", False)))
    wire2 = pdserve_pb2.ClusterStatusResponse.FromString(api.cluster_status_to_proto(status_).SerializeToString())
    back = api.cluster_status_from_proto(wire2)
    assert back == status_ and [w.worker_id for w in back.healthy_workers] == ["p0"]
    assert back.planner is None  # a router without an online planner sends none
    planned = dataclasses.replace(status_, planner=PlannerStatus(
        "apply", "ok", "1P1D", "colocated x2", 1.7e9, (PlannedConfiguration("colocated x2", 9.5, 0.97, 0.0),
                                                        PlannedConfiguration("1P1D", 12.25, 0.99, 0.5)),
        "switched colocated-1 to prefill"))
    wire3 = pdserve_pb2.ClusterStatusResponse.FromString(api.cluster_status_to_proto(planned).SerializeToString())
    assert api.cluster_status_from_proto(wire3) == planned


# ------------------------------------------------------------------------------------------- status


class _FakeRpcError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "no healthy worker"


class _CarriesCode(Exception):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    message = "the router has 8 requests in flight"


@pytest.mark.parametrize(("exc", "code"), [
    (InvalidParameterError("top_p", "must be <= 1.0, got 1.5"), grpc.StatusCode.INVALID_ARGUMENT),
    (PromptTooLongError(10, 8), grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError("router.port", "must be > 0", source="c.yaml"), grpc.StatusCode.INVALID_ARGUMENT),
    (OutOfCapacityError("needs 99 blocks"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelLoadError("no such model directory"), grpc.StatusCode.FAILED_PRECONDITION),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (TimeoutError("slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (asyncio.CancelledError(), grpc.StatusCode.CANCELLED),
    (_FakeRpcError(), grpc.StatusCode.UNAVAILABLE),
    (_CarriesCode(), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    (KeyError("x"), grpc.StatusCode.INTERNAL),
])
def test_status_mapping(exc: BaseException, code: grpc.StatusCode) -> None:
    assert status.status_for(exc) is code
    assert status.details_for(exc)


def test_details_name_the_field() -> None:
    assert status.details_for(InvalidParameterError("top_p", "must be <= 1.0, got 1.5")) == \
        "top_p: must be <= 1.0, got 1.5"
    assert status.details_for(PromptTooLongError(10, 8)).startswith("prompt: the prompt has 10 tokens")
    assert status.details_for(ConfigError("router.port", "must be > 0", "c.yaml")) == \
        "router.port: must be > 0 (in c.yaml)"
    assert status.details_for(_FakeRpcError()) == "no healthy worker"
    assert status.details_for(_CarriesCode()) == "the router has 8 requests in flight"
    assert status.details_for(RuntimeError("boom")) == "internal error: RuntimeError: boom"
    assert len(status.details_for(RuntimeError("x" * 10_000))) == status.MAX_DETAILS_CHARS


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted


class _AsyncContext(_Context):
    async def abort(self, code: grpc.StatusCode, details: str) -> None:  # type: ignore[override]
        super().abort(code, details)


def test_abort_with_sync_and_async() -> None:
    ctx = _Context()
    with pytest.raises(_Aborted):
        status.abort_with_sync(ctx, InvalidParameterError("top_p", "bad"))  # type: ignore[arg-type]
    assert ctx.aborted == (grpc.StatusCode.INVALID_ARGUMENT, "top_p: bad")
    actx = _AsyncContext()
    with pytest.raises(_Aborted):
        asyncio.run(status.abort_with(actx, OutOfCapacityError("full")))  # type: ignore[arg-type]
    assert actx.aborted == (grpc.StatusCode.RESOURCE_EXHAUSTED, "full")


# -------------------------------------------------------------------------------------- odds and ends


def test_options_merge_and_addresses() -> None:
    merged = dict(options.merged(options.SERVER_OPTIONS, [("grpc.so_reuseport", 1), ("x", 2)]))
    assert merged["grpc.so_reuseport"] == 1 and merged["x"] == 2
    assert merged["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    assert format_address("::", 5) == "[::]:5" and format_address("127.0.0.1", 5) == "127.0.0.1:5"


def test_rpc_is_torch_free() -> None:
    root = Path(__file__).resolve().parents[2] / "pdserve" / "rpc"
    allowed = ("grpc", "grpc_health", "google.protobuf", "pdserve.common", "pdserve.v1", "pdserve.rpc")
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                     else [])
            for name in names:
                if name.split(".")[0] in ("torch", "numpy") or name.startswith("pdserve."):
                    assert name.startswith(allowed), f"{path.name} imports {name}"

"""Fuzzing the router's edges (fake workers behind it): >= 1,000 generated inputs over HTTP and gRPC
(random JSON shapes, wrong types, huge, empty and out-of-range values, NaN, invalid UTF-8, undecodable
protobuf bytes). Every one is answered 4xx / INVALID_ARGUMENT (or similar client-side statuses) or
served; none gets a 5xx / INTERNAL, none hangs, and the router serves normally afterwards.
Deterministic: a seeded generator, so a failure reproduces."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import aiohttp
import grpc

from pdserve.v1 import pdserve_pb2
from tests.unit.test_router_fakes import FakeWorker, cluster, expected_tokens, generate_request, run

NUM_HTTP, NUM_GRPC, NUM_RAW = 500, 400, 150
SEED = 20261130
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream",
          "stop", "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "min_tokens", "ignore_eos", "stream_options", "user", "echo", "suffix", "best_of", "logit_bias",
          "max_completion_tokens", "stop_token_ids", "skip_special_tokens", "response_format", "tools"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(14 if depth < 4 else 10)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 7, 2 ** 31, 2 ** 63, -(2 ** 63) - 1, 2 ** 64, 10 ** 30])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1e-300, 1e300, 2.5, float("nan"), float("inf"), -float("inf")])
    if kind == 4:
        return ""
    if kind == 5:
        return "".join(chr(rng.randrange(1, 0x10FFFF)) for _ in range(rng.randrange(1, 20))
                       ).encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if kind == 6:
        return "x" * rng.choice([1, 100, 10_000, 300_000])
    if kind == 7:
        return "\ud800 lone surrogate"
    if kind == 8:
        return [rng.randrange(-5, 5000) for _ in range(rng.randrange(0, 8))]
    if kind == 9:
        return "hello"
    if kind in (10, 11):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(FIELDS + ["role", "content", "x"]): _value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _http_body(rng: random.Random) -> tuple[str, bytes, str]:
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    roll = rng.random()
    if roll < 0.1:  # not JSON at all, or not UTF-8
        body = rng.choice([b"", b"{", b"\xff\xfe\xfa", b"[" * 50_000, b'{"prompt": "\xc3\x28"}', b"null", b"123"])
        return path, body, rng.choice(["application/json", "text/plain"])
    if roll < 0.2:  # any JSON value
        return path, json.dumps(_value(rng)).encode(), "application/json"
    base: dict[str, Any] = ({"prompt": "hello", "max_tokens": 3} if path == "/v1/completions"
                            else {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    for _ in range(rng.randrange(1, 4)):  # mutate a valid request
        field = rng.choice(FIELDS)
        if rng.random() < 0.15:
            base.pop(field, None)
        else:
            base[field] = _value(rng)
    base["stream"] = base.get("stream") if rng.random() < 0.5 else rng.choice([True, False])
    text = json.dumps(base)  # NaN / Infinity stay as written: not valid JSON, the server must say so
    return path, text.encode("utf-8", "surrogatepass"), "application/json"


def _grpc_request(rng: random.Random) -> pdserve_pb2.GenerateRequest:
    request = generate_request([1, 2, 3], 3)
    which = rng.randrange(4)
    if which == 0:
        request.token_ids.ids[:] = [rng.choice([-1, 0, 5, 2 ** 62, -(2 ** 63)]) for _ in range(rng.randrange(0, 6))]
    elif which == 1:
        request.text = rng.choice(["", "x" * rng.choice([10, 200_000]), "ok"])
    elif which == 2:
        request.chat.messages.add(role=rng.choice(["user", "", "robot", "x" * 1000]),
                                  content=rng.choice(["", "hi", "y" * 50_000]))
    params = request.params
    for _ in range(rng.randrange(1, 4)):
        name = rng.choice(["max_tokens", "min_tokens", "top_k", "seed", "logprobs", "temperature", "top_p", "min_p",
                           "repetition_penalty", "frequency_penalty", "presence_penalty", "stop", "stop_token_ids"])
        if name in ("max_tokens", "min_tokens", "top_k", "seed", "logprobs"):
            setattr(params, name, rng.choice([-(2 ** 63), -1, 0, 1, 2 ** 31, 2 ** 63 - 1]))
        elif name == "stop":
            params.stop[:] = rng.choice([[""], ["a"] * 100, ["z" * 10_000]])
        elif name == "stop_token_ids":
            params.stop_token_ids[:] = [rng.choice([-5, 0, 2 ** 62])]
        else:
            setattr(params, name, rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e308]))
    if rng.random() < 0.2:
        request.request_id = rng.choice(["", "r" * 300, "dup"])
    if rng.random() < 0.1:
        request.model = rng.choice(["other", "x" * 10_000])
    return request


def test_fuzzed_inputs_get_client_errors_or_answers_never_server_errors() -> None:
    rng = random.Random(SEED)
    http_cases = [_http_body(rng) for _ in range(NUM_HTTP)]
    grpc_cases = [_grpc_request(rng) for _ in range(NUM_GRPC)]
    raw_cases = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(NUM_RAW)]
    outcomes: dict[str, int] = {}

    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", tokens_per_step=128)
        async with cluster([worker], http_port=0) as (router, stub):
            async with aiohttp.ClientSession(f"http://127.0.0.1:{router.http_port}",
                                             timeout=aiohttp.ClientTimeout(total=10)) as http:
                for path, body, content_type in http_cases:
                    async with http.post(path, data=body, headers={"Content-Type": content_type}) as r:
                        await r.read()
                        assert r.status < 500, (path, body[:300], r.status, await r.text())
                        outcomes[f"http {r.status}"] = outcomes.get(f"http {r.status}", 0) + 1
            for request in grpc_cases:
                call = stub.Generate(request, timeout=10) if request.request_id != "dup" else stub.GenerateUnary(
                    request, timeout=10)
                try:
                    if isinstance(call, grpc.aio.UnaryStreamCall):
                        async for _ in call:
                            pass
                    else:
                        await call
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                assert code is grpc.StatusCode.OK or code in CLIENT_ERRORS, (request, code)
                outcomes[f"grpc {code.name}"] = outcomes.get(f"grpc {code.name}", 0) + 1
            # bytes that are no GenerateRequest at all
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
            raw = channel.unary_unary("/pdserve.v1.PdServe/GenerateUnary", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
            for payload in raw_cases:
                try:
                    await raw(payload, timeout=10)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                assert code is grpc.StatusCode.OK or code in CLIENT_ERRORS, (payload, code)
                outcomes[f"raw {code.name}"] = outcomes.get(f"raw {code.name}", 0) + 1
            await channel.close()
            # still healthy, nothing left behind
            ok = await stub.GenerateUnary(generate_request([9, 9], 4))
            assert list(ok.token_ids) == expected_tokens([9, 9], 4)
            for _ in range(100):
                if len(router.table) == 0:
                    break
                await asyncio.sleep(0.02)
            assert len(router.table) == 0

    run(scenario, timeout=240)
    total = sum(outcomes.values())
    assert total == NUM_HTTP + NUM_GRPC + NUM_RAW >= 1000
    print("fuzz outcomes:", dict(sorted(outcomes.items())))


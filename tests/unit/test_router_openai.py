"""The router's OpenAI-compatible HTTP API over fake workers: real aiohttp server and client, real gRPC
to the workers. Answers equal what the fake workers generate; every bad input gets an OpenAI-shaped
error with the HTTP status the ecosystem uses and the field named."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from pdserve.v1 import common_pb2, pdserve_pb2
from tests.unit.test_router_fakes import (
    MODEL,
    FakeWorker,
    chat_text,
    cluster,
    expected_tokens,
    run,
    token_text,
    wait_until,
)


def _text(prompt: Any, max_tokens: int) -> str:
    return "".join(token_text(t) for t in expected_tokens(prompt, max_tokens))


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """The JSON payloads of a server-sent-event stream, then the string ``"[DONE]"``."""
    async for raw in response.content:
        line = raw.decode().strip()
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        yield data if data == "[DONE]" else json.loads(data)


def _http(router: Any) -> str:
    return f"http://127.0.0.1:{router.http_port}"


def test_models_completion_and_stream() -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker], http_port=0) as (router, _), aiohttp.ClientSession(_http(router)) as http:
            async with http.get("/v1/models") as r:
                assert r.status == 200
                models = await r.json()
            assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"

            async with http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 5,
                                                          "temperature": 0}) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            assert body["object"] == "text_completion" and body["model"] == MODEL
            assert body["choices"][0]["text"] == _text("hello", 5)
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["completion_tokens"] == 5
            assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5

            ids = [3, 4, 5]
            async with http.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "stream": True,
                                                          "stream_options": {"include_usage": True}}) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                events = [e async for e in _events(r)]
            assert events[-1] == "[DONE]"
            chunks, usage = events[:-2], events[-2]
            assert "".join(c["choices"][0]["text"] for c in chunks) == _text(ids, 6)
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
            assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
            assert len({c["id"] for c in chunks + [usage]}) == 1

            async with http.get("/health") as r:
                assert r.status == 200
    run(scenario)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1.0}, 400, "temperature"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "max_token": 8}, 400, "max_token"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
    ({"prompt": "x", "model": 3}, 400, "model"),  # a wrong type is not an unknown model
    ({"prompt": "x", "n": True}, 400, "n"),  # true == 1 in Python, but it is not an integer
    ({"prompt": "x", "echo": 0}, 400, "echo"),
    ({"prompt": "x", "user": 5}, 400, "user"),
    ({"prompt": "x", "repetition_penalty": 1e39}, 400, "repetition_penalty"),  # inf in the float32 logits
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    ([1, 2], 400, "body"),
])
def test_bad_requests_name_the_field(body: Any, status: int, param: str) -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker], http_port=0) as (router, _), aiohttp.ClientSession(_http(router)) as http:
            async with http.post("/v1/completions", json=body) as r:
                assert r.status == status, await r.text()
                error = (await r.json())["error"]
            assert error["param"] == param
            assert error["message"]
            assert not worker.submitted, "nothing may reach a worker"
    run(scenario)


def test_invalid_json_full_router_and_client_disconnect() -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", silent=True)
        async with cluster([worker], http_port=0, max_inflight_requests=1) as (router, _), \
                aiohttp.ClientSession(_http(router)) as http:
            async with http.post("/v1/completions", data=b"{not json") as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "body"
            held = await http.post("/v1/completions", json={"prompt": "x", "stream": True})
            await wait_until(lambda: len(worker.submitted) == 1, what="the first request to reach the worker")
            async with http.post("/v1/completions", json={"prompt": "y"}) as r:
                assert r.status == 429
                assert "max_inflight_requests" in (await r.json())["error"]["message"]
            held.close()  # the client goes away mid-stream: the router aborts the request at its worker
            await wait_until(lambda: worker.submitted[0].request_id in worker.aborted, timeout=5.0,
                             what="the abort of the abandoned stream")
            await wait_until(lambda: len(router.table) == 0, what="the request to leave the table")
    run(scenario)


def test_chat_completion_and_stream() -> None:
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    rendered = chat_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}])

    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker], http_port=0) as (router, _), aiohttp.ClientSession(_http(router)) as http:
            async with http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4}) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            assert body["object"] == "chat.completion"
            choice = body["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": _text(rendered, 4)}
            assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4
            submitted = worker.submitted[-1]
            assert [(m.role, m.content) for m in submitted.chat.messages] == [("system", "be brief"),
                                                                               ("user", "hi there")]
            assert not submitted.chat.no_generation_prompt and not submitted.prompt_text
            async with http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1,
                                                               "add_generation_prompt": False}) as r:
                assert r.status == 200
            assert worker.submitted[-1].chat.no_generation_prompt

            async with http.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 5,
                                                               "stream": True}) as r:
                events = [e async for e in _events(r)]
            assert events[-1] == "[DONE]"
            chunks = events[:-1]
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
            assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == _text(rendered, 5)
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    run(scenario)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2},
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "x"}, "prompt"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "foo": 1}]}, "messages[0].foo"),
    ({"messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": "x"}, "parallel_tool_calls"),
])
def test_bad_chat_requests_name_the_field(body: Any, param: str) -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker], http_port=0) as (router, _), aiohttp.ClientSession(_http(router)) as http:
            async with http.post("/v1/chat/completions", json=body) as r:
                assert r.status == 400, await r.text()
                assert (await r.json())["error"]["param"] == param
            assert not worker.submitted
    run(scenario)


def test_a_taken_http_port_fails_start_cleanly() -> None:
    async def scenario() -> None:
        import socket

        from pdserve.router import Router, RouterConfig

        worker = FakeWorker("c0", "colocated")
        await worker.start()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            router = Router(RouterConfig(host="127.0.0.1", port=0, http_port=port, describe_timeout_s=2.0),
                            model=MODEL, mode="colocated", workers=[worker.endpoint()])
            with pytest.raises(OSError):
                await router.start()
            with pytest.raises(RuntimeError, match="not started"):
                _ = router.port  # the gRPC server it had started is gone again
        await router.stop()
        await worker.stop()
    run(scenario)


def test_a_session_that_never_runs_is_released() -> None:
    async def scenario() -> None:
        from pdserve.router.servicer import PdServeServicer
        from tests.unit.test_router_fakes import generate_request

        worker = FakeWorker("c0", "colocated")
        async with cluster([worker]) as (router, _):
            servicer = PdServeServicer(model=MODEL, mode=router.mode, registry=router.registry, table=router.table,
                                       dispatcher=router.dispatcher, request_timeout_s=5.0)
            session = servicer.open_session(generate_request("x", 4))
            assert len(router.table) == 1
            session.discard()
            session.discard()
            assert len(router.table) == 0 and not worker.submitted
    run(scenario)


@pytest.mark.parametrize(("raw", "param"), [
    (json.dumps({"prompt": "x", "max_tokens": 2**63}), "max_tokens"),
    (json.dumps({"prompt": "x", "seed": 2**64}), "seed"),
    (json.dumps({"prompt": [1, 2**63]}), "prompt"),
    (json.dumps({"prompt": "a\ud800b"}), "prompt"),  # a lone surrogate: not UTF-8
    (json.dumps({"prompt": "x", "stop": ["\udfff"]}), "stop"),
    ("[" * 100_000 + "]" * 100_000, "body"),  # nested deeper than any parser recursion
    (json.dumps({"prompt": "x" * (2048 * 32 + 1)}), "prompt"),  # cannot fit max_model_len=2048: no tokenizing
])
def test_hostile_inputs_are_4xx_naming_the_field(raw: str, param: str) -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker], http_port=0) as (router, _), aiohttp.ClientSession(_http(router)) as http:
            for stream in (False, True):
                body = raw if raw.startswith("[") or not stream else raw[:-1] + ', "stream": true}'
                async with http.post("/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 400, await r.text()
                    assert (await r.json())["error"]["param"] == param
            assert not worker.submitted  # refused at the router, before any worker
            async with http.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 2}) as r:
                assert r.status == 200  # and the router is healthy after
    run(scenario)


def test_a_stream_the_worker_refuses_gets_its_4xx_before_any_event() -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated", max_prompt_tokens=4)
        async with cluster([worker], http_port=0) as (router, _), aiohttp.ClientSession(_http(router)) as http:
            async with http.post("/v1/completions", json={"prompt": [1, 2, 3, 4, 5, 6], "stream": True}) as r:
                assert r.status == 400, await r.text()
                assert r.headers["Content-Type"].startswith("application/json")
                assert (await r.json())["error"]["param"] == "prompt"  # from the worker's "prompt: ..."
            async with http.post("/v1/completions", json={"prompt": [1, 2], "stream": True, "max_tokens": 3}) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                assert [e async for e in _events(r)][-1] == "[DONE]"
    run(scenario)


def test_unknown_routes_wrong_methods_and_undecodable_bodies_get_openai_errors() -> None:
    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker], http_port=0) as (router, _), aiohttp.ClientSession(_http(router)) as http:
            for method, path, status in (("GET", "/v1/completions", 405), ("POST", "/v1/models", 405),
                                         ("PUT", "/v1/chat/completions", 405), ("GET", "/v1/embeddings", 404)):
                async with http.request(method, path) as r:
                    assert r.status == status, await r.text()
                    error = (await r.json())["error"]
                    assert path in error["message"] and error["type"] == "invalid_request_error"
                    if status == 405:
                        assert "POST" in r.headers["Allow"] or "GET" in r.headers["Allow"]
            for encoding in ("gzip", "deflate"):  # a body its Content-Encoding does not decode (the server then
                # closes the connection, its stream being unreadable: one connection per request here)
                async with aiohttp.ClientSession(_http(router), connector=aiohttp.TCPConnector(force_close=True)) as once, \
                        once.post("/v1/completions", data=b"not compressed",
                                  headers={"Content-Encoding": encoding, "Content-Type": "application/json"}) as r:
                    assert r.status == 400, await r.text()
                    assert (await r.json())["error"]["param"] == "body"
            async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "logit_bias": {}}) as r:
                assert r.status == 200, await r.text()  # an empty bias is no bias
            assert len(worker.submitted) == 1
    run(scenario)


def test_a_workers_field_error_names_the_requests_field() -> None:
    from pdserve.router.errors import RouteError
    from pdserve.router.openai_http import _error_for

    for details, param in (("prompt_token_ids: token id 9 is outside the vocabulary [0, 8)", "prompt"),
                           ("max_tokens: must be >= 1", "max_tokens"), ("the worker is draining", None)):
        response = _error_for(RouteError(grpc.StatusCode.INVALID_ARGUMENT, details))
        assert response.status == 400 and json.loads(response.body)["error"]["param"] == param


def test_a_body_that_never_arrives_is_408_and_a_control_character_in_a_request_id_is_refused(monkeypatch) -> None:  # noqa: ANN001
    from pdserve.router import openai_http

    monkeypatch.setattr(openai_http, "BODY_READ_TIMEOUT_S", 0.5)

    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker], http_port=0) as (router, stub):
            reader, writer = await asyncio.open_connection("127.0.0.1", router.http_port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\":")  # 11 of the 100 bytes it announced
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert status.split()[1] == b"408", status
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GenerateUnary(pdserve_pb2.GenerateRequest(
                    request_id="a\nforged log line", token_ids=common_pb2.TokenIds(ids=[1, 2])))
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "control" in info.value.details()
            assert not worker.submitted
    run(scenario)

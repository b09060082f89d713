"""The client SDK against a real gRPC server running a small fake PdServe servicer.

The fake generates deterministic tokens (``97 + (sum(prompt ids) + i) % 26``, three per step, each
decoding to one letter), validates parameters through pdserve.rpc.convert and fails through
pdserve.rpc.status, like the router does. Knobs on the servicer inject UNAVAILABLE, delays and
mid-stream failures; it records cancellations it observes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from pdserve.client import (
    AsyncClient,
    Client,
    Completion,
    DeadlineExceededError,
    FinishReason,
    InvalidArgumentError,
    PdserveClientError,
    SamplingParams,
    UnavailableError,
    Usage,
)
from pdserve.client.errors import ERROR_CLASSES, error_for
from pdserve.common.errors import PdserveError
from pdserve.common.outputs import Logprob, RequestDelta
from pdserve.rpc import api, convert
from pdserve.rpc.server import PDSERVE_SERVICE, RunningServer, start_server
from pdserve.rpc.status import abort_with
from pdserve.rpc.types import ClusterStatus, ModelInfo, WorkerStatus
from pdserve.v1 import common_pb2, pdserve_pb2, pdserve_pb2_grpc

TOKENS_PER_STEP = 3


def _fake_tokens(prompt_ids: list[int], n: int) -> list[int]:
    return [97 + (sum(prompt_ids) + i) % 26 for i in range(n)]


class FakePdServe(pdserve_pb2_grpc.PdServeServicer):
    """A deterministic stand-in for the router's PdServe servicer."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.fail_unavailable = 0  # the next N generate calls fail with UNAVAILABLE before any token
        self.unavailable_after_first = False  # fail with UNAVAILABLE after the first streamed response
        self.delay_s = 0.0  # before every step
        self.cancelled = threading.Event()

    def _deltas(self, request: pdserve_pb2.GenerateRequest) -> list[RequestDelta]:
        prompt = api.prompt_from_request(request)
        params = convert.sampling_params_from_proto(request.params)
        if isinstance(prompt, common_pb2.ChatPrompt):
            prompt = "".join(m.role + m.content for m in prompt.messages)
        ids = list(prompt.encode()) if isinstance(prompt, str) else prompt
        tokens = _fake_tokens(ids, params.max_tokens)
        finish, stop_reason = FinishReason.LENGTH, None
        for i, t in enumerate(tokens):
            if t in params.stop_token_ids:
                tokens, finish, stop_reason = tokens[: i + 1], FinishReason.STOP, t
                break
        deltas = []
        for start in range(0, len(tokens), TOKENS_PER_STEP):
            step = tokens[start:start + TOKENS_PER_STEP]
            last = start + TOKENS_PER_STEP >= len(tokens)
            text = "".join(chr(t) for t in step if t != stop_reason)
            logprobs = None if params.logprobs is None else [{t: Logprob(-0.5, 1, chr(t))} for t in step]
            deltas.append(RequestDelta("engine-id", step, text, logprobs, finished=last,
                                       finish_reason=finish if last else None,
                                       stop_reason=stop_reason if last else None,
                                       num_prompt_tokens=len(ids), num_cached_tokens=1))
        return deltas

    async def _admit(self, request: pdserve_pb2.GenerateRequest,
                     context: grpc.aio.ServicerContext) -> list[RequestDelta]:
        self.calls += 1
        try:
            deltas = self._deltas(request)
        except PdserveError as exc:
            await abort_with(context, exc)
        if self.fail_unavailable > 0:
            self.fail_unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy worker")
        return deltas

    async def Generate(self, request: pdserve_pb2.GenerateRequest,  # noqa: N802 (gRPC's name)
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pdserve_pb2.GenerateResponse]:
        deltas = await self._admit(request, context)
        assembler = convert.ResponseAssembler(request.request_id or f"req-{self.calls}")
        try:
            for i, delta in enumerate(deltas):
                if i > 0 and self.unavailable_after_first:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the decode worker went away")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield assembler.add(delta)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def GenerateUnary(self, request: pdserve_pb2.GenerateRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> pdserve_pb2.GenerateResponse:
        deltas = await self._admit(request, context)
        assembler = convert.ResponseAssembler(request.request_id or f"req-{self.calls}")
        try:
            for delta in deltas:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                assembler.add(delta)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return assembler.unary_response()

    async def ListModels(self, request: Any, context: Any) -> pdserve_pb2.ListModelsResponse:  # noqa: N802
        return api.list_models_response([ModelInfo("fake", 128, 256)])

    async def ClusterStatus(self, request: Any, context: Any) -> pdserve_pb2.ClusterStatusResponse:  # noqa: N802
        return api.cluster_status_to_proto(ClusterStatus("colocated", "fake", (WorkerStatus("w0", "colocated",
                                                                                            healthy=True),), 0))


class ServerThread:
    """A grpc.aio server on its own event loop thread, so that blocking clients can call it."""

    def __init__(self, servicer: FakePdServe) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = self._run(start_server(
            lambda s: pdserve_pb2_grpc.add_PdServeServicer_to_server(servicer, s), "127.0.0.1", 0,
            service_names=[PDSERVE_SERVICE]))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def stop(self) -> None:
        self._run(self.running.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerThread, FakePdServe]]:
    servicer = FakePdServe()
    thread = ServerThread(servicer)
    yield thread, servicer
    thread.stop()


@pytest.fixture
def fake(server: tuple[ServerThread, FakePdServe]) -> FakePdServe:
    server[1].reset()
    return server[1]


@pytest.fixture
def address(server: tuple[ServerThread, FakePdServe]) -> str:
    return server[0].running.address


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    with Client(address, timeout=10.0, retry_backoff=0.01) as c:
        yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------ generate


def test_unary_and_stream_give_the_same_completion(client: Client, fake: FakePdServe) -> None:
    expected = _fake_tokens(list(b"Hello"), 10)
    out = client.generate("Hello", max_tokens=10, temperature=0.0)
    assert out.token_ids == expected and out.text == "".join(map(chr, expected))
    assert out.finish_reason is FinishReason.LENGTH and out.stop_reason is None and out.logprobs is None
    assert out.usage == Usage(prompt_tokens=5, completion_tokens=10, cached_prompt_tokens=1)

    chunks = list(client.generate_stream("Hello", max_tokens=10, temperature=0.0))
    assert len(chunks) == 4 and [len(c.token_ids) for c in chunks] == [3, 3, 3, 1]
    assert [c.finish_reason for c in chunks] == [None, None, None, FinishReason.LENGTH]
    assert [c.usage is not None for c in chunks] == [False, False, False, True]
    streamed = Completion.from_chunks(chunks)
    assert (streamed.text, streamed.token_ids, streamed.finish_reason, streamed.usage) == \
        (out.text, out.token_ids, out.finish_reason, out.usage)
    assert not fake.cancelled.is_set()  # a stream read to its end ends as OK, not cancelled


def test_token_ids_sampling_params_stop_tokens_and_logprobs(client: Client, fake: FakePdServe) -> None:
    ids = [1, 2, 3]
    stop = _fake_tokens(ids, 5)[4]
    out = client.generate(prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=20, logprobs=1),
                          stop_token_ids=[stop], request_id="mine")
    assert out.request_id == "mine" and out.token_ids == _fake_tokens(ids, 5)
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop and len(out.text) == 4
    assert out.logprobs is not None and len(out.logprobs) == 5
    assert out.logprobs[0][out.token_ids[0]].decoded_token == chr(out.token_ids[0])
    last = list(client.generate_stream(prompt_token_ids=ids, max_tokens=20, stop_token_ids=[stop]))[-1]
    assert last.finish_reason is FinishReason.STOP and last.stop_reason == stop


def test_chat_messages(client: Client, fake: FakePdServe) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = _fake_tokens(list(b"systembe briefuserhi"), 5)
    assert client.generate(messages=messages, max_tokens=5).token_ids == want
    assert [t for c in client.generate_stream(messages=messages, max_tokens=5) for t in c.token_ids] == want
    calls = fake.calls
    with pytest.raises(InvalidArgumentError) as info:
        client.generate(messages=[{"role": "user"}])
    assert info.value.field == "messages[0]"
    with pytest.raises(InvalidArgumentError) as info:
        client.generate("Hello", messages=messages)
    assert info.value.field == "prompt" and fake.calls == calls  # caught before sending


def test_invalid_arguments_name_the_field(client: Client, fake: FakePdServe) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.generate("Hello", top_p=1.5)
    assert info.value.field == "top_p" and info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("top_p: ") and isinstance(info.value, PdserveError)
    stream = client.generate_stream("Hello", temperature=-1)
    with pytest.raises(InvalidArgumentError) as info:
        next(stream)
    assert info.value.field == "temperature"
    calls = fake.calls
    for kwargs in ({"temperature": "hot"}, {"max_tokens": 1.5}, {"prompt_token_ids": [1]}, {"no_such": 1}):
        with pytest.raises(InvalidArgumentError):
            client.generate("Hello", **kwargs)
    with pytest.raises(InvalidArgumentError) as info:
        client.generate()
    assert info.value.field == "prompt" and fake.calls == calls  # caught before sending


def test_unavailable_is_retried_before_the_first_token(address: str, fake: FakePdServe) -> None:
    with Client(address, max_retries=3, retry_backoff=0.01) as c:
        fake.fail_unavailable = 2
        assert c.generate("Hi", max_tokens=4).usage.completion_tokens == 4 and fake.calls == 3
        fake.fail_unavailable, fake.calls = 2, 0
        assert Completion.from_chunks(c.generate_stream("Hi", max_tokens=4)).token_ids == _fake_tokens(list(b"Hi"), 4)
        assert fake.calls == 3
    with Client(address, max_retries=1, retry_backoff=0.01) as c:
        fake.fail_unavailable, fake.calls = 5, 0
        with pytest.raises(UnavailableError) as info:
            c.generate("Hi")
        assert fake.calls == 2 and not info.value.unreachable


def test_unavailable_after_a_token_is_raised_not_retried(client: Client, fake: FakePdServe) -> None:
    fake.unavailable_after_first = True
    received = []
    with pytest.raises(UnavailableError, match="went away"):
        for chunk in client.generate_stream("Hello", max_tokens=10):
            received.append(chunk)
    assert len(received) == 1 and fake.calls == 1


def test_deadlines(client: Client, fake: FakePdServe) -> None:
    fake.delay_s = 0.5
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        client.generate("Hello", max_tokens=10, timeout=0.2)
    with pytest.raises(DeadlineExceededError):
        list(client.generate_stream("Hello", max_tokens=10, timeout=0.2))
    assert time.monotonic() - start < 3
    fake.fail_unavailable = 1000  # retries stop at the deadline, raising the last error
    fake.delay_s = 0.0
    with Client(client.target, timeout=0.5, max_retries=1000, retry_backoff=0.05) as c:
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            c.generate("Hello")
        assert time.monotonic() - start < 2


def test_breaking_out_of_a_stream_cancels_it_on_the_server(client: Client, fake: FakePdServe) -> None:
    fake.delay_s = 0.05
    for chunk in client.generate_stream("Hello", max_tokens=10_000):
        assert chunk.token_ids
        break
    assert fake.cancelled.wait(1.0), "the servicer did not see the cancellation"
    fake.cancelled.clear()
    stream = client.generate_stream("Hello", max_tokens=10_000)
    next(stream)
    stream.close()
    assert fake.cancelled.wait(1.0)


def test_models_status_and_health(client: Client, fake: FakePdServe) -> None:
    assert client.list_models() == [ModelInfo("fake", 128, 256)]
    status = client.cluster_status()
    assert status.mode == "colocated" and status.workers[0].healthy
    assert client.health() and client.health(PDSERVE_SERVICE) and not client.health("no.such.Service")


def test_unreachable_server(fake: FakePdServe) -> None:
    with Client(f"127.0.0.1:{_free_port()}", timeout=5.0, max_retries=1, retry_backoff=0.01) as c:
        assert not c.health(timeout=1.0)
        with pytest.raises(UnavailableError) as info:
            c.generate("Hello")
        assert info.value.unreachable
    dns = "errors resolving nowhere.invalid:1: [field:hostname lookup error:address lookup failed]"
    assert UnavailableError(grpc.StatusCode.UNAVAILABLE, dns).unreachable


def test_timeouts_must_be_positive(client: Client) -> None:
    with pytest.raises(ValueError, match="timeout"):
        Client("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        client.generate("Hello", timeout=-1.0)
    with Client(client.target, timeout=None) as unbounded:  # no deadline at all
        assert unbounded.generate("Hi", max_tokens=2).usage.completion_tokens == 2


def test_every_status_code_has_an_error_class() -> None:
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        error = error_for(code, "field_x: went wrong")
        assert isinstance(error, ERROR_CLASSES[code]) and isinstance(error, PdserveClientError)
        assert error.code is code and error.details == "field_x: went wrong" and code.name in str(error)
    assert error_for(grpc.StatusCode.INVALID_ARGUMENT, "field_x: bad").field == "field_x"  # type: ignore[attr-defined]
    assert error_for(grpc.StatusCode.INVALID_ARGUMENT, "no field here").field is None  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------- asyncio


def test_async_client(address: str, fake: FakePdServe) -> None:
    async def main() -> None:
        async with AsyncClient(address, timeout=10.0, retry_backoff=0.01) as ac:
            out = await ac.generate("Hello", max_tokens=7)
            chunks = [c async for c in ac.generate_stream("Hello", max_tokens=7)]
            streamed = Completion.from_chunks(chunks)
            assert (streamed.text, streamed.token_ids, streamed.usage, streamed.finish_reason) == \
                (out.text, out.token_ids, out.usage, FinishReason.LENGTH)
            assert out.token_ids == _fake_tokens(list(b"Hello"), 7)

            with pytest.raises(InvalidArgumentError) as info:
                await ac.generate("Hello", top_p=1.5)
            assert info.value.field == "top_p"

            fake.fail_unavailable, fake.calls = 2, 0
            assert len([c async for c in ac.generate_stream("Hi", max_tokens=4)]) == 2 and fake.calls == 3

            fake.unavailable_after_first = True
            with pytest.raises(UnavailableError):
                async for _ in ac.generate_stream("Hello", max_tokens=10):
                    pass
            fake.unavailable_after_first = False

            fake.delay_s = 0.5
            with pytest.raises(DeadlineExceededError):
                await ac.generate("Hello", timeout=0.2)
            fake.cancelled.clear()
            fake.delay_s = 0.05
            async for _ in ac.generate_stream("Hello", max_tokens=10_000):
                break
            deadline = time.monotonic() + 1.0
            while not fake.cancelled.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert fake.cancelled.is_set(), "the servicer did not see the cancellation"

            assert await ac.list_models() == [ModelInfo("fake", 128, 256)]
            assert (await ac.cluster_status()).model == "fake"
            assert await ac.health()

    asyncio.run(main())


# ----------------------------------------------------------------------------------- CLI, torch-free


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_generate_with_target(address: str, fake: FakePdServe) -> None:
    done = _cli("generate", "--target", address, "--max-tokens", "8", "Hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(map(chr, _fake_tokens(list(b"Hello"), 8))) + "\n"
    assert "[finish_reason=length]" in done.stderr and "completion_tokens=8" in done.stderr

    done = _cli("generate", "--target", address, "--top-p", "1.5", "Hello")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("pdserve: error:")
    assert "top_p" in done.stderr

    port = _free_port()
    done = _cli("generate", "--target", f"127.0.0.1:{port}", "--timeout", "5", "Hello")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"no server answered at 127.0.0.1:{port}" in done.stderr


def test_cli_chat_and_status_with_target(address: str, fake: FakePdServe) -> None:
    done = _cli("generate", "--target", address, "--chat", "--max-tokens", "4", "Hi")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(map(chr, _fake_tokens(list(b"userHi"), 4))) + "\n"  # sent as a user message

    done = _cli("status", "--target", address)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "fake (colocated): 1/1 workers healthy, 0 requests in flight"
    assert lines[1].split() == ["worker", "role", "address", "healthy", "running", "waiting", "kv_usage",
                                "queued_prefill_tokens", "restarts", "last_recovery_s"]
    assert lines[2].split() == ["w0", "colocated", "yes", "0", "0", "0.00", "0", "0", "-"]
    done = _cli("status", "--target", address, "--json")
    assert json.loads(done.stdout)["workers"][0]["worker_id"] == "w0"

    port = _free_port()
    done = _cli("status", "--target", f"127.0.0.1:{port}", "--timeout", "3")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"no router answered at 127.0.0.1:{port}" in done.stderr


def test_cli_target_and_client_do_not_import_torch(address: str, fake: FakePdServe) -> None:
    code = ("import sys, pdserve.client\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy') or m.startswith('pdserve.engine')]\n"
            "assert not bad, bad\n"
            "from pdserve.cluster.cli import main\n"
            f"assert main(['generate', '--target', {address!r}, '--max-tokens', '2', 'Hi']) == 0\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


def test_the_sdk_needs_neither_torch_nor_ray() -> None:
    """``pip install pdserve`` (no ``[server]`` extra) brings grpcio and protobuf only: the SDK imports and
    makes calls with every server dependency unimportable."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ['torch', 'ray', 'numpy', 'yaml', 'aiohttp', 'safetensors', 'tokenizers', 'jinja2', 'tqdm',"
        " 'triton', 'transformers']:\n"
        "    sys.modules[m] = None\n"
        "from pdserve.client import Client, SamplingParams, UnavailableError\n"
        "with Client('127.0.0.1:1', timeout=2, max_retries=0) as c:\n"
        "    try:\n"
        "        c.generate('hi', sampling_params=SamplingParams(max_tokens=2))\n"
        "    except UnavailableError:\n"
        "        print('unavailable as expected')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "unavailable as expected" in done.stdout

"""``pdserve serve`` as a newcomer runs it: it starts its own local Ray, serves the built-in tiny model,
answers ``pdserve generate --target`` and OpenAI-style HTTP completions (whose greedy tokens equal
the offline engine's), and on Ctrl-C stops leaving no stray Ray processes behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest


def _ray_processes() -> int:
    count = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"raylet" in cmd or b"gcs_server" in cmd:
                count += 1
    return count


def _offline(prompt: str, max_tokens: int) -> tuple[Any, Any]:
    """The offline engine's greedy completion of ``prompt`` and of ``prompt`` as a user message, with
    the sampled tokens' logprobs (two alternatives each)."""
    from pdserve import LLM, SamplingParams

    llm = LLM(model="tiny-random")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2)
    return llm.generate([prompt], params)[0], llm.chat([{"role": "user", "content": prompt}], params)[0]


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _chosen_logprobs(output: Any) -> list[float]:
    return [position[t].logprob for t, position in zip(output.token_ids, output.logprobs, strict=True)]


def _serve(*args: str, pattern: str) -> tuple[subprocess.Popen, re.Match]:
    """Start ``pdserve serve`` with ``args`` on its own local Ray; wait for the banner line matching
    ``pattern``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1",
                                                                         "RAY_AUTH_MODE": "disabled"}
    server = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    assert server.stdout is not None
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line and server.poll() is not None:
            break
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return server, match
    server.kill()
    raise AssertionError("pdserve serve did not start:\n" + "".join(lines))


def test_serve_then_ctrl_c_shuts_down_cleanly() -> None:
    before = _ray_processes()
    server, match = _serve("--port", "0", "--http-port", "0",
                           pattern=r"serving on (\S+) \(gRPC\), (\S+) \(OpenAI HTTP\)")
    try:
        address, http = match.group(1), match.group(2)
        assert _ray_processes() > before
        done = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--target", address, "--max-tokens", "6",
                               "Hello"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        completion, chat_completion = _offline("Hello", 6)
        answer = _post(f"{http}/completions", {"model": "tiny-random", "prompt": "Hello", "max_tokens": 6,
                                               "temperature": 0, "logprobs": 2})
        assert answer["usage"]["completion_tokens"] == 6
        choice = answer["choices"][0]
        assert choice["text"] == completion.text
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(_chosen_logprobs(completion), abs=1e-4)
        assert "".join(choice["logprobs"]["tokens"]) == completion.text
        chat = _post(f"{http}/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
                                                  "temperature": 0, "logprobs": True, "top_logprobs": 2})
        choice = chat["choices"][0]
        assert choice["message"]["content"] == chat_completion.text
        assert [t["logprob"] for t in choice["logprobs"]["content"]] == pytest.approx(
            _chosen_logprobs(chat_completion), abs=1e-4)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=90) == 0
    finally:
        if server.poll() is None:
            server.kill()
    end = time.monotonic() + 30
    while _ray_processes() > before and time.monotonic() < end:
        time.sleep(0.5)
    assert _ray_processes() == before


def test_sigterm_drains_streams_in_flight_then_exits_0() -> None:
    """SIGTERM (what Kubernetes sends) stops admission, lets the open stream finish every token, refuses
    new requests with UNAVAILABLE meanwhile, then exits 0 (not killed by Ray's handler)."""
    from pdserve.client import Client, UnavailableError

    server, match = _serve("--port", "0", "--http-port", "-1", pattern=r"serving on (\S+) \(gRPC\)")
    try:
        address, sent = match.group(1), False
        with Client(address, timeout=60) as client:
            received = 0
            stream = client.generate_stream("Hello", max_tokens=300, temperature=0.0, ignore_eos=True)
            for chunk in stream:
                received += len(chunk.token_ids)
                if received < 300 and not sent:
                    server.send_signal(signal.SIGTERM)
                    sent = True
                    refused = None
                    deadline = time.monotonic() + 10  # the signal reaches the router's loop soon, not at once
                    while refused is None and time.monotonic() < deadline:
                        try:
                            client.generate("another", max_tokens=2, timeout=5)
                            time.sleep(0.05)
                        except UnavailableError as exc:
                            refused = exc
                    assert refused is not None, "new requests were still admitted 10 s after SIGTERM"
            assert received == 300 and chunk.finish_reason == "length"
        assert server.wait(timeout=90) == 0
    finally:
        if server.poll() is None:
            server.kill()

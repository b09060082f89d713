"""Access control on the router's client ports: API keys on gRPC (metadata) and HTTP (Authorization),
checked against digests in constant time, never echoed; TLS on both ports; the SDK sends the key."""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import grpc
import pytest

from pdserve.client import AsyncClient, UnauthenticatedError
from pdserve.common.errors import ConfigError
from pdserve.router.config import RouterConfig
from pdserve.rpc.auth import API_KEYS_ENV, ApiKeys, bearer_token
from pdserve.v1 import pdserve_pb2
from tests.unit.test_router_fakes import FakeWorker, cluster, expected_tokens, generate_request, run

KEY = "sk-test-0123456789abcdef"


def test_keys_load_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# operators\n{KEY}\n\n  other-key  \n")
    keys = ApiKeys.load(str(path), environ={API_KEYS_ENV: "env-key, more"})
    assert len(keys) == 4 and keys.enabled
    assert all(keys.check(k) for k in (KEY, "other-key", "env-key", "more"))
    assert not any(keys.check(k) for k in ("", None, KEY[:-1], KEY + "x", "# operators"))
    assert not ApiKeys.load(None, environ={}).enabled and ApiKeys([]).check(None)


@pytest.mark.parametrize("content, environ, field", [
    ("\n# only comments\n", {}, "router.api_keys_file"),
    (None, {API_KEYS_ENV: " , "}, API_KEYS_ENV),
    ("two words\n", {}, "router.api_keys_file"),
])
def test_bad_key_sources_are_refused(tmp_path: Path, content: str | None, environ: dict, field: str) -> None:
    path = None
    if content is not None:
        path = tmp_path / "keys"
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        ApiKeys.load(str(path) if path else None, environ=environ)
    assert err.value.key == field
    with pytest.raises(ConfigError):
        ApiKeys.load(str(tmp_path / "missing"), environ={})


def test_bearer_token_parsing() -> None:
    assert bearer_token(f"Bearer {KEY}") == KEY and bearer_token(f"bearer  {KEY} ") == KEY
    assert bearer_token(KEY) is None and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_tls_needs_both_files() -> None:
    with pytest.raises(ConfigError) as err:
        RouterConfig(tls_cert_file="cert.pem")
    assert err.value.key == "tls_cert_file"


def test_every_request_without_a_valid_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker], http_port=0, api_keys_file=str(path)) as (router, stub):
            target = f"127.0.0.1:{router.port}"
            # gRPC: no key, a wrong key, the right one (raw stub and SDK)
            for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GenerateUnary(generate_request([1, 2], 3), metadata=metadata)
                assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
                assert KEY not in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(generate_request([1, 2], 3)):
                    pass
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListModels(pdserve_pb2.ListModelsRequest())
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
            ok = await stub.GenerateUnary(generate_request([1, 2], 3), metadata=(("authorization", f"Bearer {KEY}"),))
            assert list(ok.token_ids) == expected_tokens([1, 2], 3)
            async with AsyncClient(target, max_retries=0) as client:
                with pytest.raises(UnauthenticatedError):
                    await client.generate(prompt_token_ids=[1, 2], max_tokens=3)
                assert await client.health()  # health checks need no key
            async with AsyncClient(target, api_key=KEY) as client:
                assert (await client.generate(prompt_token_ids=[1, 2], max_tokens=3)).token_ids == expected_tokens([1, 2], 3)
                chunks = [c async for c in client.generate_stream(prompt_token_ids=[1, 2], max_tokens=3)]
                assert [t for c in chunks for t in c.token_ids] == expected_tokens([1, 2], 3)
            # HTTP: /v1 needs the key; /health and /metrics do not
            async with aiohttp.ClientSession(f"http://127.0.0.1:{router.http_port}") as http:
                for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
                    async with http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                                         headers=headers) as r:
                        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                        body = await r.json()
                    assert body["error"]["code"] == "invalid_api_key" and KEY not in str(body)
                async with http.get("/v1/models") as r:
                    assert r.status == 401
                async with http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}) as r:
                    assert r.status == 200
                for page in ("/health", "/metrics"):
                    async with http.get(page) as r:
                        assert r.status == 200, page

    run(scenario)
    assert KEY not in caplog.text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_on_both_client_ports(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)

    async def scenario() -> None:
        worker = FakeWorker("c0", "colocated")
        async with cluster([worker], http_port=0, tls_cert_file=str(cert), tls_key_file=str(key)) as (router, _):
            credentials = grpc.ssl_channel_credentials(cert.read_bytes())
            async with AsyncClient(f"localhost:{router.port}", credentials=credentials) as client:
                assert (await client.generate(prompt_token_ids=[4], max_tokens=2)).token_ids == expected_tokens([4], 2)
            async with AsyncClient(f"localhost:{router.port}", max_retries=0, timeout=5) as plain:
                with pytest.raises(Exception):  # noqa: B017 - a plaintext client cannot talk to a TLS port
                    await plain.generate(prompt_token_ids=[4], max_tokens=2)
            context = ssl.create_default_context(cafile=str(cert))
            async with (aiohttp.ClientSession(f"https://localhost:{router.http_port}") as http,
                        http.get("/health", ssl=context) as r):
                assert r.status == 200

    run(scenario)

"""Bad input through the real cluster gets clear errors and loses nothing; a mismatched KV handshake fails
clearly; bad config files fail clearly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest

from pdserve import SamplingParams
from pdserve.client import Client, InvalidArgumentError
from pdserve.cluster.config import KVTransferConfig, load_cluster_config
from pdserve.cluster.roles import make_role
from pdserve.common.config import EngineConfig
from pdserve.common.errors import ConfigError
from pdserve.rpc.auth import peer_channel
from pdserve.rpc.convert import delta_from_proto, sampling_params_to_proto
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.worker.host import WorkerHost
from tests.e2e.cluster_support import offline, start_cluster, wait_until_idle


@pytest.fixture(scope="module")
def cluster(ray_session):
    c = start_cluster("disaggregated")
    yield c
    c.stop()


@pytest.mark.parametrize(("kwargs", "field"), [({"top_p": 2.0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
                                               ({"temperature": -1.0}, "temperature"), ({"logprobs": 99}, "logprobs")])
def test_invalid_parameters_come_back_as_invalid_argument(cluster, kwargs: dict, field: str) -> None:
    with Client(cluster.router_address, timeout=30) as client, pytest.raises(InvalidArgumentError) as info:
        client.generate("Hello", **kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == field


def test_prompt_too_long_is_invalid_argument_and_loses_nothing(cluster) -> None:
    with Client(cluster.router_address, timeout=30) as client:
        with pytest.raises(InvalidArgumentError, match="max_model_len"):
            client.generate("x" * 600, max_tokens=4)
        assert client.generate("still fine", max_tokens=4, temperature=0.0).finish_reason in ("length", "stop")
    for s in wait_until_idle(cluster):
        assert s["free_blocks"] == s["usable_blocks"]


def test_logprobs_and_stop_strings_travel(cluster) -> None:
    with Client(cluster.router_address, timeout=30) as client:
        out = client.generate("Hello", max_tokens=6, temperature=0.0, logprobs=2, ignore_eos=True)
        assert out.logprobs is not None and len(out.logprobs) == 6
        assert all(out.token_ids[i] in out.logprobs[i] for i in range(6))
        stop = out.text[2:4]
        stopped = client.generate("Hello", max_tokens=6, temperature=0.0, stop=[stop], ignore_eos=True)
        assert stopped.finish_reason == "stop" and stopped.text == out.text[: out.text.index(stop)]


def test_cli_generate_against_the_cluster(cluster) -> None:
    done = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--target", cluster.router_address,
                           "--max-tokens", "8", "Hello"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "finish_reason" in done.stderr and done.stdout.strip()


def test_mismatched_handshake_fails_the_request_clearly() -> None:
    transfer = KVTransferConfig(backend="gloo", timeout_s=10)
    prefill = WorkerHost("p-bad", make_role("prefill"), EngineConfig(num_kv_blocks=64, block_size=8, max_model_len=256), transfer)
    decode = WorkerHost("d-bad", make_role("decode"), EngineConfig(num_kv_blocks=64, block_size=16, max_model_len=256), transfer)
    try:
        prefill_address, decode_address = prefill.start(), decode.start()
        delta = asyncio.run(_submit_and_wait(decode_address, prefill_address))
        assert delta.finished and delta.finish_reason == "error" and delta.error_code == "FAILED_PRECONDITION"
        assert "block_size" in delta.error and "16" in delta.error and "8" in delta.error
        decode.call_engine(lambda e: e.check_invariants())
        assert decode.stats()["free_blocks"] == decode.stats()["usable_blocks"]
    finally:
        prefill.stop()
        decode.stop()


def test_prefill_without_handshake_is_failed_precondition() -> None:
    """A Prefill call from a decode worker that never shook hands is refused with FAILED_PRECONDITION
    naming the peer (the status code used to be swallowed into the message argument)."""
    prefill = WorkerHost("p-lonely", make_role("prefill"), EngineConfig(num_kv_blocks=64, max_model_len=256),
                         KVTransferConfig(backend="gloo", timeout_s=10))
    try:
        address = prefill.start()

        async def call() -> grpc.aio.AioRpcError:
            async with peer_channel(address, None) as channel:  # with the cluster token, as the router
                stub = worker_pb2_grpc.WorkerStub(channel)
                request = worker_pb2.PrefillRequest(request_id="r", decode_worker_id="d-unknown",
                                                    params=sampling_params_to_proto(SamplingParams(max_tokens=2)))
                request.prompt_token_ids.ids.extend([1, 2, 3])
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Prefill(request, timeout=30)
                return info.value

        error = asyncio.run(call())
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "d-unknown" in (error.details() or "")
    finally:
        prefill.stop()


async def _submit_and_wait(decode_address: str, prefill_address: str, request_id: str = "mismatch",
                           prompt: str = "Hello", params: SamplingParams | None = None):  # noqa: ANN202
    """Submit one request to a decode worker and return its final delta, with every token id."""
    async with peer_channel(decode_address, None) as channel:  # with the cluster token, as the router
        stub = worker_pb2_grpc.WorkerStub(channel)
        updates = stub.Updates(worker_pb2.UpdatesRequest())
        await updates.read()
        proto = sampling_params_to_proto(params or SamplingParams(max_tokens=4))
        await stub.Submit(worker_pb2.SubmitRequest(request_id=request_id, prompt_text=prompt, params=proto,
                                                   prefill_address=prefill_address))
        tokens: list[int] = []
        while True:
            update = await asyncio.wait_for(updates.read(), 30)
            for msg in update.deltas:
                delta = delta_from_proto(msg)
                if delta.request_id == request_id:
                    tokens.extend(delta.new_token_ids)
                    if delta.finished:
                        updates.cancel()
                        delta.new_token_ids = tokens
                        return delta


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_prefill_worker_lost_mid_request_ends_in_the_failure_policy(policy: str) -> None:
    """The Prefill call fails after the decode worker expected the KV (its peer is gone): the transfer is
    cancelled and its completion callback runs the policy: recompute locally (the offline engine's
    tokens) or fail clearly; either way every block comes back."""
    transfer = KVTransferConfig(backend="gloo", timeout_s=10, on_failure=policy)
    engine = EngineConfig(num_kv_blocks=64, max_model_len=256)
    prefill = WorkerHost("p-gone", make_role("prefill"), engine, transfer)
    decode = WorkerHost("d-left", make_role("decode"), engine, transfer)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    try:
        prefill_address, decode_address = prefill.start(), decode.start()
        first = asyncio.run(_submit_and_wait(decode_address, prefill_address, "ok", "Hello there", greedy))
        assert first.finish_reason == "length" and len(first.new_token_ids) == 6  # handshake done, KV landed
        prefill.stop()
        delta = asyncio.run(_submit_and_wait(decode_address, prefill_address, "orphan", "Hello again", greedy))
        if policy == "recompute":
            assert delta.finish_reason == "length" and delta.error is None
            assert delta.new_token_ids == offline(["Hello again"], greedy)[0]
            assert decode.stats()["local_recomputes"] == 1
        else:
            assert delta.finish_reason == "error" and "prefill on" in (delta.error or "")
            assert delta.error_code == "UNAVAILABLE"  # a lost peer is retryable, never INTERNAL
        assert decode.stats()["failed_transfers"] == 1
        decode.call_engine(lambda e: e.check_invariants())
        assert decode.stats()["free_blocks"] == decode.stats()["usable_blocks"]
    finally:
        prefill.stop()
        decode.stop()


@pytest.mark.parametrize(("text", "key"), [
    ("mode: sideways\n", "mode"),
    ("prefill: {replicas: -1}\n", "prefill.replicas"),
    ("decode: {max_running_requests: many}\n", "decode.max_running_requests"),
    ("kv_transfer: {backend: carrier-pigeon}\n", "kv_transfer.backend"),
    ("router: {grpc_port: 70000}\n", "router.port"),
    ("engine: {block_size: 12}\n", "engine.block_size"),
    ("prefil: {replicas: 1}\n", "prefil"),
    ("prefill: [1, 2\n", "config"),
])
def test_bad_config_files_name_the_key(tmp_path, text: str, key: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_cluster_config(path)
    assert info.value.key == key and str(path) in str(info.value)


def test_serve_with_a_bad_config_exits_2_with_one_line(tmp_path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("prefill: {replicas: -1}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "pdserve", "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 2
    assert "prefill.replicas" in done.stderr and "Traceback" not in done.stderr

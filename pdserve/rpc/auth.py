"""Bearer keys on gRPC and HTTP: the router's API keys, and the cluster token of the workers' ports.

**Cluster token.** :class:`~pdserve.cluster.launcher.Cluster` mints a random token at start-up
(``PDSERVE_CLUSTER_TOKEN``, unless set already: then every process of the cluster must get the same
value) and hands it to its worker actors; each worker's gRPC port then refuses calls without it
(UNAUTHENTICATED, health checks excepted), and the router and the decode workers send it on every
channel to a worker (:func:`peer_channel`). Not covered: the decode workers' KV stores (torch's
``TCPStore`` has no authentication) and the NCCL/gloo groups: keep the nodes on a private network.

**API keys** of the router's client ports: ``Authorization: Bearer <key>`` on HTTP and in gRPC metadata.

Keys come from a file (``router.api_keys_file``: one key per line, ``#`` comments and blank lines
ignored) and/or the environment (``PDSERVE_API_KEYS``: comma-separated). Only their SHA-256 digests
are kept, a presented key is compared with every digest in constant time (``hmac.compare_digest``,
no early exit), and no key or presented credential is ever logged or echoed in an error.

What is protected: every ``PdServe`` RPC and every ``/v1/*`` HTTP route. What is not: the gRPC health
service and HTTP ``/health`` (load balancers and Kubernetes probes carry no key) and ``/metrics``
(scrapers; keep that port internal, as with vLLM's ``--api-key``). Without any key configured the
router accepts every request (and warns when it binds beyond localhost).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from pdserve.common.errors import ConfigError
from pdserve.rpc.server import with_precheck

API_KEYS_ENV = "PDSERVE_API_KEYS"
CLUSTER_TOKEN_ENV = "PDSERVE_CLUSTER_TOKEN"
#: RPCs that need no key: health checks (probes and load balancers cannot send one).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
UNAUTHENTICATED_MESSAGE = "a valid API key is required: send 'authorization: Bearer <key>'"


class ApiKeys:
    """The accepted keys (as digests); :meth:`check` a presented one. Empty: authentication is off."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    @classmethod
    def load(cls, keys_file: str | None, environ: dict[str, str] | None = None) -> ApiKeys:
        """Keys from ``keys_file`` and ``PDSERVE_API_KEYS``; :class:`ConfigError` if the file cannot be
        read or a source that is given holds no key."""
        env = os.environ if environ is None else environ
        keys: list[str] = []
        if keys_file:
            try:
                lines = Path(keys_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError("router.api_keys_file", f"cannot read {keys_file!r}: {exc.__class__.__name__}") from None
            from_file = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not from_file:
                raise ConfigError("router.api_keys_file", f"{keys_file!r} holds no key")
            keys += from_file
        raw = env.get(API_KEYS_ENV)
        if raw is not None:
            from_env = [k.strip() for k in raw.split(",") if k.strip()]
            if not from_env:
                raise ConfigError(API_KEYS_ENV, "is set but holds no key")
            keys += from_env
        for key in keys:
            if any(c.isspace() for c in key) or not key.isprintable():
                raise ConfigError("router.api_keys_file" if keys_file else API_KEYS_ENV,
                                  "API keys must be printable and contain no whitespace")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the keys (always true when authentication is off)."""
        if not self._digests:
            return True
        digest = _digest(presented or "")
        ok = False
        for known in self._digests:  # every digest compared: the time does not depend on which matched
            ok |= hmac.compare_digest(known, digest)
        return ok and bool(presented)

    def check_authorization(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries a valid bearer key."""
        return self.check(bearer_token(header))


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses RPCs without a valid key with UNAUTHENTICATED (health checks excepted)."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self._keys.check_authorization(metadata.get("authorization")):
            return handler
        return with_precheck(handler, _refuse_unauthenticated)


async def _refuse_unauthenticated(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def cluster_token() -> str | None:
    """This process's cluster token (``PDSERVE_CLUSTER_TOKEN``), or None outside a launched cluster."""
    return os.environ.get(CLUSTER_TOKEN_ENV) or None


class _BearerMetadata:
    """Adds ``authorization: Bearer <token>`` to the calls of a channel."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = tuple(details.metadata or ()) + (self._entry,)
        return details._replace(metadata=metadata)


class _UnaryBearer(_BearerMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamBearer(_BearerMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


def peer_channel(address: str, options: Any) -> grpc.aio.Channel:
    """A channel to a worker of this cluster, carrying the cluster token when there is one."""
    token = cluster_token()
    # one interceptor per call kind: a channel files each interceptor under one kind only
    interceptors: list[grpc.aio.ClientInterceptor] | None = (
        [_UnaryBearer(token), _StreamBearer(token)] if token else None)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def peer_interceptors() -> list[grpc.aio.ServerInterceptor] | None:
    """The interceptors of a worker's gRPC server: refuse calls without the cluster token (if any)."""
    token = cluster_token()
    return [ApiKeyInterceptor(ApiKeys([token]))] if token else None

"""The router's TLS material: the key and certificate chain its gRPC port serves, and the HTTP port's context
built from the same files. Errors name the config field to fix."""

from __future__ import annotations

import ssl
from pathlib import Path

from pdserve.common.errors import ConfigError
from pdserve.router.config import RouterConfig


def read_tls(config: RouterConfig) -> tuple[bytes, bytes] | None:
    """``(private_key, certificate_chain)`` PEM bytes from the config's files, or None without TLS."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    out = []
    for name, path in (("router.tls_key_file", config.tls_key_file), ("router.tls_cert_file", config.tls_cert_file)):
        try:
            out.append(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(name, f"cannot read {path!r}: {exc.strerror or exc}") from None
    return out[0], out[1]


def server_ssl_context(config: RouterConfig) -> ssl.SSLContext:
    """The HTTP port's TLS context (same certificate and key as the gRPC port)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(config.tls_cert_file), str(config.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("router.tls_cert_file", f"cannot load the certificate and key: {exc}") from None
    return context

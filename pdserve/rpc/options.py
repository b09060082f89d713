"""gRPC channel and server options that pdserve's clients and servers agree on.

Both sides allow messages of up to :data:`MAX_MESSAGE_BYTES`. Clients send keepalive pings every
:data:`KEEPALIVE_TIME_MS` (also while idle, so a dead server is noticed before the next request), and
servers accept pings that often instead of answering them with ``GOAWAY too_many_pings``.
"""

from __future__ import annotations

from collections.abc import Sequence

ChannelOptions = Sequence[tuple[str, int | str]]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The largest message either side sends or accepts (64 MiB)."""

#: Calls a server may hold before its handlers pick them up (above the router's default admission limit).
MAX_PENDING_CALLS = 16_384

KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000

SERVER_OPTIONS: ChannelOptions = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # Accept client pings every KEEPALIVE_TIME_MS / 3 (the default, 5 minutes, would make the server
    # close connections of clients that ping every 30 s).
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 3),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 3),
    # Fail loudly when the port is taken instead of silently sharing it with another process.
    ("grpc.so_reuseport", 0),
    # grpc-core queues at most 1,000 calls the application has not picked up yet and cancels the
    # excess (measured: 2,000 streams opened at once lost ~200 with a bare CANCELLED before any pdserve
    # code saw them); admission control (max_inflight_requests, expected TTFT) is pdserve's to do.
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
)
"""Options of every pdserve gRPC server."""

CHANNEL_OPTIONS: ChannelOptions = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect soon after a failed connection, so that retries can reach a server that just came up.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)
"""Options of every pdserve gRPC client channel."""


def merged(base: ChannelOptions, extra: ChannelOptions | None) -> list[tuple[str, int | str]]:
    """``base`` with the entries of ``extra`` replacing those of the same name (``extra`` wins)."""
    if not extra:
        return list(base)
    overridden = {name for name, _ in extra}
    return [(name, value) for name, value in base if name not in overridden] + list(extra)

"""Router configuration: the serving mode, the worker endpoints and the router's own settings.

Everything here is a frozen dataclass validated once on construction; a bad value raises
:class:`~pdserve.common.errors.ConfigError` naming the field, so a YAML loader can point at the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.common.errors import ConfigError, InvalidParameterError
from pdserve.common.roles import ServingMode, WorkerRole
from pdserve.common.validation import ValidatedConfig, require_float, require_int
from pdserve.router.plan_applier import ApplyConfig

__all__ = ["RouterConfig", "ServingMode", "WorkerEndpoint", "WorkerRole", "check_topology"]


@dataclass(frozen=True)
class WorkerEndpoint:
    """One worker the router talks to: a unique id, its role, its gRPC ``host:port`` and, when known,
    the node it runs on (``node``: e.g. its Ray node id; workers on one node move KV fastest)."""

    worker_id: str
    role: WorkerRole
    address: str
    node: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.worker_id, str) or not self.worker_id:
            raise ConfigError("worker_id", "must be a non-empty string")
        try:
            object.__setattr__(self, "role", WorkerRole(self.role))
        except ValueError:
            raise ConfigError(f"workers.{self.worker_id}.role",
                              f"must be one of {', '.join(r.value for r in WorkerRole)}; got {self.role!r}") from None
        host, sep, port = str(self.address).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"workers.{self.worker_id}.address", f"must be 'host:port', got {self.address!r}")


PLANNER_MODES = ("off", "recommend", "apply")


@dataclass(frozen=True)
class RouterConfig(ValidatedConfig):
    """Settings of one router process.

    * ``host``/``port``: where the ``PdServe`` gRPC service listens (``port=0``: any free port; the
      bound one is returned by :meth:`Router.start`).
    * ``http_port``: where the OpenAI-compatible HTTP API listens, on the same host (``0``: any free
      port, see :attr:`Router.http_port`; ``None``: no HTTP API).
    * ``request_timeout_s``: a request that receives nothing (no token, no error) for this long is
      aborted at its worker and fails with DEADLINE_EXCEEDED. It is an idle timeout, not a total one.
    * ``stream_writes_per_s``: the write rate the router aims to stay under on its client streams, all
      together. Each stream writes its first tokens at once; after that it writes at most every
      ``in-flight requests / stream_writes_per_s`` seconds (at most 50 ms), carrying every token that
      arrived meanwhile, so at high concurrency the router's one core is not spent writing every token
      on its own (on a 2-core CPU run with 200-300 streams the router took 38-44 us of CPU per relayed
      token, half of it in stream writes; ``benchmarks/router_stream.py``). Below that load, every
      step's tokens leave at once. 0: write every step's tokens
      at once (like SGLang's ``stream_interval`` 1). TPOT and end-to-end times are unchanged but for the
      last write's wait; the gaps between chunks grow to the interval.
    * ``processes``: how many router processes serve the gRPC port, all sharing it (``SO_REUSEPORT``: the
      kernel spreads client *connections* over them, so one client channel stays on one process). One
      process relayed ~38k streamed tokens a second on an H200 host's CPU, two ~64k
      (``benchmarks/router_stream.py``, fake workers); one H200 decoding an 8B model streams up to ~25k. The
      cluster launcher runs the first process (the HTTP API, ``/metrics``, the dashboard, the planner)
      and ``processes - 1`` more as Ray actors on its node, each with its own view of the workers'
      load; ``ScalePool``/``SwitchRole`` reaching one of those is forwarded to the first. Each
      process's ``ClusterStatus`` and admission count its own requests; every second the launcher copies
      the others' request logs and Prometheus samples into the first, so its dashboard, its planner
      and its ``/metrics`` count them all. Ray restarts a router process that died, and the launcher starts its router
      again over the workers as they are then.
    * ``max_retries_before_first_token``: how many *other* workers a request may be re-submitted to when
      its worker turns out unavailable, as long as no token has reached the client yet.
    * ``max_stream_migrations``: how many times a stream whose decode worker was lost after tokens
      reached the client may continue on another decode worker (from the tokens already sent: see
      :meth:`~pdserve.router.session.RequestSession.run`); 0: such streams fail with UNAVAILABLE.
    * ``no_worker_wait_s``: how long a new request waits for a usable worker of its pool (one that is
      restarting) before it fails with UNAVAILABLE; 0: fail at once.
    * ``max_inflight_requests``: admission limit; the next request fails with RESOURCE_EXHAUSTED.
    * ``admission_max_ttft_s``: refuse (RESOURCE_EXHAUSTED / HTTP 429 with a retry time) a request whose
      expected time to first token exceeds this (see :mod:`pdserve.router.admission`); a gRPC
      client's deadline is such a limit too. None: only client deadlines.
    * ``kv_usage_weight``/``running_requests_weight``: the decode policy's weights (see
      :class:`~pdserve.router.decode_policy.LeastLoadedDecodePolicy`).
    * ``min_remote_prefill_tokens``: in disaggregated mode, prompts shorter than this are prefilled on
      the decode worker itself (0: every prompt is prefilled remotely).
    * ``max_queued_prefill_tokens``: conditional disaggregation. When every prefill worker already has
      at least this many prompt tokens queued, the next prompt is prefilled on its decode worker
      instead of waiting (0: never). The prefill pool then sets the TTFT only while it keeps up; past
      that, decode workers absorb the overflow, at some cost to their inter-token latency.
    * ``ttft_slo_ms``: the time-to-first-token SLO (the cluster's ``slo.ttft_ms``). In disaggregated
      mode a prompt whose prefill pool would miss it goes to its decode worker when that is faster
      (TTFT-aware placement, replacing ``max_queued_prefill_tokens``); None: off.
    * ``tpot_slo_ms``: the time-per-output-token SLO (the cluster's ``slo.tpot_ms``): the dashboard
      scores attainment against it (and ``ttft_slo_ms``); None: not scored.
    * ``planner_mode``: ``off``, ``recommend`` or ``apply``: every ``planner_interval_s`` the router
      simulates every configuration of its GPUs on the last ``planner_window_s`` of traffic, over the workers' own
      step-time models, and publishes the best (dashboard, ``pdserve:planner_*`` metrics). ``apply``
      also acts: a configuration predicted ``planner_min_gain`` better than the current one in
      ``planner_confirmations`` rounds in a row moves one worker between the prefill and decode pools
      (a role switch, no restart; colocated is reached as decode workers only), at most once per
      ``planner_dwell_s``
      (:mod:`~pdserve.router.plan_applier`). Needs both SLOs.
    * ``prefix_affinity_weight``: cache-aware routing (:mod:`~pdserve.router.prefix_affinity`). A
      worker's score gains this weight times the share of the prompt's prefix blocks it was sent
      before (0: off, routing by load alone; 1: a fully seen prefix outweighs any load difference).
    * ``prefill_locality_weight``: a prefill worker on the same node as the request's decode worker
      (KV over the node's fast path: CUDA IPC / NVLink rather than the network) gains this much score
      (0: off; the default 0.5 decides between equally loaded workers and never beats a shorter queue
      by more than half the longest).
    * ``describe_timeout_s``/``submit_timeout_s``/``abort_timeout_s``: per-RPC timeouts to workers.
    * ``health_check_interval_s``: how often unhealthy workers are probed again with ``Describe``.
    * ``shutdown_grace_s``: on shutdown (SIGTERM, Ctrl-C) the router stops admitting (readiness turns
      false, new requests get UNAVAILABLE) and lets requests in flight finish for up to this long.
    * ``reconnect_backoff_initial_s``/``reconnect_backoff_max_s``: exponential backoff of a dropped
      ``Worker.Updates`` stream.
    * ``api_keys_file``: API keys for the client ports, one per line (see :mod:`pdserve.rpc.auth`;
      ``PDSERVE_API_KEYS`` adds comma-separated ones). None and no such variable: no authentication.
    * ``tls_cert_file``/``tls_key_file``: PEM certificate chain and private key; both set: the gRPC and
      HTTP ports speak TLS only.
    """

    host: str = "0.0.0.0"
    port: int = 0
    http_port: int | None = None
    request_timeout_s: float = 60.0
    stream_writes_per_s: float = 10000.0
    processes: int = 1
    max_retries_before_first_token: int = 2
    max_stream_migrations: int = 3
    no_worker_wait_s: float = 10.0
    max_inflight_requests: int = 4096
    admission_max_ttft_s: float | None = None
    kv_usage_weight: float = 0.5
    running_requests_weight: float = 0.5
    min_remote_prefill_tokens: int = 0
    max_queued_prefill_tokens: int = 0
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    planner_mode: str = "off"
    planner_interval_s: float = 30.0
    planner_window_s: float = 300.0
    planner_dwell_s: float = 300.0
    planner_confirmations: int = 2
    planner_min_gain: float = 0.1
    prefix_affinity_weight: float = 0.0
    prefill_locality_weight: float = 0.5
    describe_timeout_s: float = 5.0
    submit_timeout_s: float = 10.0
    abort_timeout_s: float = 5.0
    health_check_interval_s: float = 2.0
    shutdown_grace_s: float = 30.0
    reconnect_backoff_initial_s: float = 0.1
    reconnect_backoff_max_s: float = 5.0
    api_keys_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @property
    def apply_config(self) -> ApplyConfig:
        return ApplyConfig(self.planner_dwell_s, self.planner_confirmations, self.planner_min_gain)

    def _validate(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise InvalidParameterError("host", "must be a non-empty string")
        require_int("port", self.port, minimum=0, maximum=65535)
        if self.http_port is not None:
            require_int("http_port", self.http_port, minimum=0, maximum=65535)
        require_int("max_retries_before_first_token", self.max_retries_before_first_token, minimum=0)
        require_int("max_stream_migrations", self.max_stream_migrations, minimum=0)
        require_int("max_inflight_requests", self.max_inflight_requests, minimum=1)
        require_int("min_remote_prefill_tokens", self.min_remote_prefill_tokens, minimum=0)
        require_int("max_queued_prefill_tokens", self.max_queued_prefill_tokens, minimum=0)
        if self.admission_max_ttft_s is not None:
            require_float("admission_max_ttft_s", self.admission_max_ttft_s, minimum=0.0, exclusive_minimum=True)
        if self.planner_mode not in PLANNER_MODES:
            raise ConfigError("planner_mode", f"must be one of {', '.join(PLANNER_MODES)}, got {self.planner_mode!r}")
        require_int("processes", self.processes, minimum=1)
        require_float("planner_interval_s", self.planner_interval_s, minimum=1.0)
        require_float("planner_window_s", self.planner_window_s, minimum=1.0, maximum=300.0)  # what the log keeps
        ApplyConfig(self.planner_dwell_s, self.planner_confirmations, self.planner_min_gain)  # validates them
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            if getattr(self, name) is not None:
                require_float(name, getattr(self, name), minimum=0.0, exclusive_minimum=True)
        require_float("shutdown_grace_s", self.shutdown_grace_s, minimum=0.0)
        require_float("no_worker_wait_s", self.no_worker_wait_s, minimum=0.0)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise InvalidParameterError("tls_cert_file", "give both tls_cert_file and tls_key_file, or neither")
        for name in ("api_keys_file", "tls_cert_file", "tls_key_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidParameterError(name, "must be a non-empty path")
        for name in ("request_timeout_s", "describe_timeout_s", "submit_timeout_s", "abort_timeout_s",
                     "health_check_interval_s", "reconnect_backoff_initial_s", "reconnect_backoff_max_s"):
            require_float(name, getattr(self, name), minimum=0.0, exclusive_minimum=True)
        require_float("stream_writes_per_s", self.stream_writes_per_s, minimum=0.0)
        if self.reconnect_backoff_max_s < self.reconnect_backoff_initial_s:
            raise InvalidParameterError("reconnect_backoff_max_s", "must be >= reconnect_backoff_initial_s")
        require_float("kv_usage_weight", self.kv_usage_weight, minimum=0.0)
        require_float("running_requests_weight", self.running_requests_weight, minimum=0.0)
        require_float("prefix_affinity_weight", self.prefix_affinity_weight, minimum=0.0)
        require_float("prefill_locality_weight", self.prefill_locality_weight, minimum=0.0)
        if self.kv_usage_weight + self.running_requests_weight <= 0.0:
            raise InvalidParameterError("kv_usage_weight", "kv_usage_weight + running_requests_weight must be > 0")


def check_topology(mode: ServingMode, workers: Sequence[WorkerEndpoint], *, starting: bool = True) -> None:
    """Reject worker lists that cannot serve ``mode``: duplicate ids, or roles the mode does not use.

    Disaggregated mode starts with at least one prefill and one decode worker, and may hold colocated
    workers beside them (they prefill every prompt they get; a decode worker may be switched to one while
    serving); later (``starting=False``: workers added or switched while serving) the prefill pool may be
    empty, decode workers then prefilling every prompt themselves, and colocated workers may stand in for
    the decode pool. Colocated mode needs colocated workers only.
    """
    seen: set[str] = set()
    for worker in workers:
        if worker.worker_id in seen:
            raise ConfigError(f"workers.{worker.worker_id}", "duplicate worker_id")
        seen.add(worker.worker_id)
    roles = {w.role for w in workers}
    if mode is ServingMode.DISAGGREGATED:
        needed = {WorkerRole.PREFILL, WorkerRole.DECODE} if starting else set()
        missing = needed - roles
        if missing:
            raise ConfigError("workers", f"disaggregated mode needs prefill and decode workers; none with role "
                                         f"{', '.join(sorted(r.value for r in missing))}")
        if not roles & set(mode.stream_roles):
            raise ConfigError("workers", "disaggregated mode needs a decode (or colocated) worker to stream tokens")
    else:
        if roles != {WorkerRole.COLOCATED}:
            raise ConfigError("workers", "colocated mode takes colocated workers only (at least one)")

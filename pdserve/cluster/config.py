"""The cluster config: a YAML file loaded into frozen, validated dataclasses.

Every error names the offending key by its dotted path and the file, e.g.
``cluster.yaml: prefill.replicas: must be >= 0, got -1``. Example::

    model: tiny-random            # or a local HF directory
    load_format: auto             # auto | dummy
    mode: disaggregated           # or colocated (workers do both phases, with chunked prefill)
    engine: {block_size: 16}      # engine settings shared by every worker (see pdserve.EngineConfig)
    prefill: {replicas: 1, gpus_per_worker: 0, max_batch_tokens: 8192}
    decode:  {replicas: 1, gpus_per_worker: 0, max_running_requests: 256}
    colocated: {replicas: 2}      # colocated mode only; default: prefill + decode replicas
    # a pool's tensor_parallel_size: ranks per worker (default: its gpus_per_worker, 1 on CPU), e.g.
    # prefill: {gpus_per_worker: 2, tensor_parallel_size: 2}; decode: {gpus_per_worker: 1}
    router:  {grpc_port: 50051, http_port: 8000}   # http_port: the OpenAI-compatible HTTP API
    kv_transfer: {backend: auto}  # CUDA IPC on one host, else NCCL on GPUs; gloo/tcp on CPU
    slo: {ttft_ms: 250, tpot_ms: 15}   # optional: SLO-aware scheduling and routing (see SLOConfig)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pdserve.common.config import MAX_POOL_REPLICAS, TINY_RANDOM_MODEL, EngineConfig
from pdserve.common.errors import ConfigError, InvalidParameterError
from pdserve.common.kv_transfer_config import KVTransferConfig
from pdserve.common.roles import ServingMode
from pdserve.common.validation import require_float, require_int
from pdserve.router.config import RouterConfig

MODES = tuple(mode.value for mode in ServingMode)


@dataclass(frozen=True)
class PoolConfig:
    """One pool of identical workers. ``engine`` overrides the shared engine settings for this pool;
    ``ray_resources`` are custom Ray resources each of its workers requests (e.g. ``{pdserve_prefill: 1}``),
    which pins the pool to the nodes that advertise them (a Kubernetes worker group per pool).

    ``tensor_parallel_size`` is the number of tensor-parallel ranks in each worker (0: not set, so its
    ``gpus_per_worker``, or 1 on CPU). A GPU worker runs one rank per GPU, so when both are given they must
    be equal; with ``gpus_per_worker: 0`` the ranks run on the CPU over gloo (tests, small models). It is
    the same setting as ``engine: {tensor_parallel_size}``, which may not disagree with it."""

    replicas: int = 1
    gpus_per_worker: int = 0
    tensor_parallel_size: int = 0
    max_batch_tokens: int = 8192
    max_running_requests: int = 256
    engine: dict[str, Any] = field(default_factory=dict)
    ray_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_int("replicas", self.replicas, minimum=0, maximum=MAX_POOL_REPLICAS)
        require_int("gpus_per_worker", self.gpus_per_worker, minimum=0, maximum=8)
        require_int("tensor_parallel_size", self.tensor_parallel_size, minimum=0, maximum=64)
        if self.gpus_per_worker and self.tensor_parallel_size and self.tensor_parallel_size != self.gpus_per_worker:
            raise InvalidParameterError("tensor_parallel_size", f"a worker of {self.gpus_per_worker} GPU(s) runs one "
                                        f"rank per GPU, got {self.tensor_parallel_size} ranks: make "
                                        f"gpus_per_worker and tensor_parallel_size equal")
        engine_size = self.engine.get("tensor_parallel_size") if isinstance(self.engine, dict) else None
        if self.tensor_parallel_size and engine_size is not None and engine_size != self.tensor_parallel_size:
            raise InvalidParameterError("engine.tensor_parallel_size", f"{engine_size!r} disagrees with the pool's "
                                        f"tensor_parallel_size {self.tensor_parallel_size}: set one of them")
        require_int("max_batch_tokens", self.max_batch_tokens, minimum=1)
        require_int("max_running_requests", self.max_running_requests, minimum=1)
        if not isinstance(self.engine, dict):
            raise InvalidParameterError("engine", "must be a mapping of engine settings")
        if not isinstance(self.ray_resources, dict):
            raise InvalidParameterError("ray_resources", "must be a mapping of Ray resource names to amounts")
        for name, amount in self.ray_resources.items():
            if not isinstance(name, str) or not name or name in ("CPU", "GPU", "memory"):
                raise InvalidParameterError("ray_resources", f"{name!r}: a custom resource name (CPU and GPU come "
                                            f"from gpus_per_worker)")
            if isinstance(amount, bool) or not isinstance(amount, int | float) or not amount > 0:
                raise InvalidParameterError(f"ray_resources.{name}", f"must be a number > 0, got {amount!r}")


@dataclass(frozen=True)
class SLOConfig:
    """Latency objectives the cluster schedules for. ``tpot_ms`` becomes the step-time budget of every
    decode and colocated worker (a step carrying decodes takes prefill tokens only up to it, by the
    worker's measured step-time model); ``ttft_ms`` orders every worker's prompt queue by deadline and
    lets the router keep a prompt on its decode worker when the prefill pool would miss it. A pool's
    own ``engine`` settings (``step_time_budget_ms``, ``ttft_slo_ms``) override these."""

    ttft_ms: float = 250.0
    tpot_ms: float = 25.0

    def __post_init__(self) -> None:
        require_float("ttft_ms", self.ttft_ms, minimum=0.0, exclusive_minimum=True)
        require_float("tpot_ms", self.tpot_ms, minimum=0.0, exclusive_minimum=True)


@dataclass(frozen=True)
class ClusterConfig:
    model: str = TINY_RANDOM_MODEL
    load_format: str = "auto"
    mode: str = "disaggregated"
    engine: dict[str, Any] = field(default_factory=dict)
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    colocated: PoolConfig | None = None
    # the cluster's router listens on this host only unless the config says otherwise (router.host)
    router: RouterConfig = field(default_factory=lambda: RouterConfig(host="127.0.0.1", port=50051, http_port=8000))
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    pack_pairs: bool = False  # place prefill/decode workers pairwise on one node (Ray placement group)
    slo: SLOConfig | None = None
    max_worker_restarts: int = 8  # a dead worker process is started again this many times (-1: always)

    def __post_init__(self) -> None:
        if isinstance(self.max_worker_restarts, bool) or not isinstance(self.max_worker_restarts, int) \
                or self.max_worker_restarts < -1:
            raise ConfigError("max_worker_restarts", f"must be an integer >= -1 (-1: always restart), got "
                                                     f"{self.max_worker_restarts!r}")
        if self.mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.mode == "disaggregated" and (self.prefill.replicas < 1 or self.decode.replicas < 1):
            raise ConfigError("prefill.replicas", "disaggregated mode needs at least one prefill and one decode worker")
        if self.mode == "colocated" and self.colocated_pool.replicas < 1:
            raise ConfigError("colocated.replicas", "colocated mode needs at least one worker")
        if self.slo is not None and self.router.ttft_slo_ms is None:
            object.__setattr__(self, "router", replace(self.router, ttft_slo_ms=self.slo.ttft_ms))
        if self.slo is not None and self.router.tpot_slo_ms is None:  # the dashboard's attainment
            object.__setattr__(self, "router", replace(self.router, tpot_slo_ms=self.slo.tpot_ms))
        if self.router.planner_mode != "off" and (self.router.ttft_slo_ms is None or self.router.tpot_slo_ms is None):
            raise ConfigError("router.planner_mode", "the planner scores configurations against the SLOs: set "
                              "slo: {ttft_ms, tpot_ms} too")
        sizes = {role: self.engine_config(role).tensor_parallel_size for role in self.roles}  # (validates them)
        for role in self.roles:
            gpus = self.pool(role).gpus_per_worker
            if gpus and sizes[role] != gpus:
                raise ConfigError(f"{role}.gpus_per_worker", f"a worker of {gpus} GPU(s) runs one tensor-parallel "
                                  f"rank per GPU, but its engine's tensor_parallel_size is {sizes[role]}: make "
                                  f"them equal")
        if self.mode == "disaggregated":
            low, high = sorted((sizes["prefill"], sizes["decode"]))
            if high % low:
                raise ConfigError("decode.engine.tensor_parallel_size", f"the prefill and decode degrees must divide "
                                  f"one another (KV heads move in {high} groups per layer): {sizes}")
            object.__setattr__(self, "kv_transfer", replace(self.kv_transfer, head_groups=high))

    @property
    def colocated_pool(self) -> PoolConfig:
        if self.colocated is not None:
            return self.colocated
        gpus = max(self.prefill.gpus_per_worker, self.decode.gpus_per_worker)
        pools = (self.prefill, self.decode)
        # stated by either pool: the larger of their ranks (a pool that states none has its GPU count)
        ranks = max(p.tensor_parallel_size or p.gpus_per_worker for p in pools) \
            if any(p.tensor_parallel_size for p in pools) else 0
        if gpus and ranks and gpus != ranks:
            raise ConfigError("colocated", f"the default colocated pool (the larger of the prefill and decode "
                              f"settings) would run {ranks} ranks on {gpus} GPU(s): give a colocated section")
        return PoolConfig(replicas=self.prefill.replicas + self.decode.replicas, gpus_per_worker=gpus,
                          tensor_parallel_size=ranks,
                          max_batch_tokens=self.prefill.max_batch_tokens,
                          max_running_requests=self.decode.max_running_requests)

    @property
    def roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.mode == "disaggregated" else ("colocated",)

    def pool(self, role: str) -> PoolConfig:
        return {"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated_pool}[role]

    def engine_config(self, role: str) -> EngineConfig:
        pool = self.pool(role)
        slo: dict[str, Any] = {}
        if self.slo is not None:
            slo["ttft_slo_ms"] = self.slo.ttft_ms
            if role != "prefill":  # prefill workers run no decodes: no TPOT to protect
                slo["step_time_budget_ms"] = self.slo.tpot_ms
        settings = {"max_num_batched_tokens": pool.max_batch_tokens, "max_num_seqs": pool.max_running_requests,
                    "device": "cuda" if pool.gpus_per_worker else "cpu",
                    "tensor_parallel_size": max(1, pool.gpus_per_worker), **slo, **self.engine, **pool.engine,
                    "model": self.model, "load_format": self.load_format}
        if pool.tensor_parallel_size:
            settings["tensor_parallel_size"] = pool.tensor_parallel_size
        return EngineConfig.from_dict(settings, prefix=f"{role}.engine." if pool.engine else "engine.")


#: Environment variables ``PDSERVE__<SECTION>__<KEY>=<value>`` override the config file (or the
#: built-in default): the path is the setting's, upper-cased, levels joined by ``__`` (e.g.
#: ``PDSERVE__ROUTER__GRPC_PORT=50051``, ``PDSERVE__DECODE__REPLICAS=4``, ``PDSERVE__MODEL=/models/x``),
#: the value is read as a YAML scalar (``8``, ``true``, ``0.5``, ``null``, text).
ENV_OVERRIDE_PREFIX = "PDSERVE__"


def load_cluster_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> ClusterConfig:
    """The cluster config of the YAML file at ``path`` (None: the built-in default) with the
    ``PDSERVE__*`` overrides of ``environ`` (default: this process's environment) applied."""
    data: Any = {}
    source = "the built-in default"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError("config", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", str(path)) from None
    names = apply_env_overrides(data, os.environ if environ is None else environ)
    if names:
        source += " with " + ", ".join(names)
    return cluster_config_from_dict(data, source=source)


def apply_env_overrides(data: Any, environ: Mapping[str, str]) -> list[str]:
    """Set every ``PDSERVE__*`` override of ``environ`` in ``data`` (in place); returns their names."""
    names = sorted(k for k in environ if k.startswith(ENV_OVERRIDE_PREFIX))
    if names and not isinstance(data, dict):
        raise ConfigError("config", "the top level must be a mapping of settings")
    for name in names:
        path = name[len(ENV_OVERRIDE_PREFIX):].lower().split("__")
        if not all(path):
            raise ConfigError(name, "an empty level in the setting's path (use __ between levels only)")
        try:
            value = yaml.safe_load(environ[name])
        except yaml.YAMLError:
            raise ConfigError(name, f"not a YAML scalar: {environ[name]!r}") from None
        node = data
        for i, key in enumerate(path[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(name, f"{'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return names


def cluster_config_from_dict(data: Any, source: str | None = None) -> ClusterConfig:
    if not isinstance(data, dict):
        raise ConfigError("config", "the top level must be a mapping of settings", source)
    known = {f.name for f in fields(ClusterConfig)} | {"placement"}
    _reject_unknown("", data, known, source)
    kwargs: dict[str, Any] = {k: v for k, v in data.items() if k not in ("prefill", "decode", "colocated", "router",
                                                                       "kv_transfer", "placement", "slo")}
    try:
        for role in ("prefill", "decode", "colocated"):
            if role in data:
                kwargs[role] = _section(role, data[role], PoolConfig, source)
        if "router" in data:
            router = {"host": "127.0.0.1", **_mapping("router", data["router"], source)}
            if "grpc_port" in router:
                router["port"] = router.pop("grpc_port")
            kwargs["router"] = _section("router", router, RouterConfig, source)
        if "kv_transfer" in data:
            kwargs["kv_transfer"] = _section("kv_transfer", data["kv_transfer"], KVTransferConfig, source)
        if data.get("slo") is not None:
            kwargs["slo"] = _section("slo", data["slo"], SLOConfig, source)
        if "placement" in data:
            placement = _mapping("placement", data["placement"], source)
            _reject_unknown("placement.", placement, {"pack_pairs"}, source)
            kwargs["pack_pairs"] = placement.get("pack_pairs", False)
        for key in ("model", "load_format", "mode"):
            if key in kwargs and not isinstance(kwargs[key], str):
                raise ConfigError(key, f"must be a string, got {kwargs[key]!r}")
        if "engine" in kwargs:
            kwargs["engine"] = dict(_mapping("engine", kwargs["engine"], source))
        return ClusterConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.message, source) from None


def _mapping(key: str, value: Any, source: str | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping, got {type(value).__name__}", source)
    return value


def _reject_unknown(prefix: str, data: dict[str, Any], known: set[str], source: str | None) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown setting; known: {', '.join(sorted(known))}", source)


def _section(name: str, value: Any, cls: type, source: str | None) -> Any:
    data = _mapping(name, value, source)
    _reject_unknown(f"{name}.", data, {f.name for f in fields(cls)} | ({"grpc_port"} if cls is RouterConfig else set()),
                    source)
    try:
        return cls(**data)
    except InvalidParameterError as exc:
        raise ConfigError(f"{name}.{exc.field}", exc.message, source) from None
    except ConfigError as exc:
        raise ConfigError(f"{name}.{exc.key}", exc.message, source) from None

"""Router settings and worker lists are validated once, naming the bad key; the package is torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdserve.common.errors import ConfigError
from pdserve.router import Router, RouterConfig, ServingMode, WorkerEndpoint, WorkerRole
from pdserve.router.config import check_topology


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"port": 70000}, "port"),
    ({"request_timeout_s": 0}, "request_timeout_s"),
    ({"stream_writes_per_s": -1.0}, "stream_writes_per_s"),
    ({"processes": 0}, "processes"),
    ({"max_inflight_requests": 0}, "max_inflight_requests"),
    ({"max_retries_before_first_token": -1}, "max_retries_before_first_token"),
    ({"max_stream_migrations": -1}, "max_stream_migrations"),
    ({"kv_usage_weight": -0.1}, "kv_usage_weight"),
    ({"kv_usage_weight": 0.0, "running_requests_weight": 0.0}, "kv_usage_weight"),
    ({"reconnect_backoff_initial_s": 2.0, "reconnect_backoff_max_s": 1.0}, "reconnect_backoff_max_s"),
    ({"host": ""}, "host"),
])
def test_bad_router_settings_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RouterConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


def test_router_config_is_frozen() -> None:
    config = RouterConfig()
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


def test_worker_endpoints() -> None:
    assert WorkerEndpoint("d0", "decode", "host:1").role is WorkerRole.DECODE  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="workers.d0.role"):
        WorkerEndpoint("d0", "encoder", "host:1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="workers.d0.address"):
        WorkerEndpoint("d0", "decode", "host")  # type: ignore[arg-type]


def _endpoints(*roles: str) -> list[WorkerEndpoint]:
    return [WorkerEndpoint(f"w{i}", role, f"h:{1000 + i}") for i, role in enumerate(roles)]  # type: ignore[arg-type]


def test_topology_checks() -> None:
    check_topology(ServingMode.DISAGGREGATED, _endpoints("prefill", "decode", "decode"))
    check_topology(ServingMode.COLOCATED, _endpoints("colocated"))
    check_topology(ServingMode.DISAGGREGATED, _endpoints("decode", "decode"), starting=False)  # 0P2D, later
    # colocated workers beside the pools (a decode worker switched to that role), even in place of them later
    check_topology(ServingMode.DISAGGREGATED, _endpoints("prefill", "decode", "colocated"))
    check_topology(ServingMode.DISAGGREGATED, _endpoints("prefill", "colocated"), starting=False)
    with pytest.raises(ConfigError, match="needs a decode \\(or colocated\\) worker"):
        check_topology(ServingMode.DISAGGREGATED, _endpoints("prefill"), starting=False)
    with pytest.raises(ConfigError, match="none with role prefill"):
        check_topology(ServingMode.DISAGGREGATED, _endpoints("decode"))
    with pytest.raises(ConfigError, match="colocated workers only"):
        check_topology(ServingMode.COLOCATED, _endpoints("colocated", "decode"))
    with pytest.raises(ConfigError, match="duplicate"):
        check_topology(ServingMode.COLOCATED, [WorkerEndpoint("w", "colocated", "h:1")] * 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Router(RouterConfig(), model="m", mode="mixed", workers=_endpoints("colocated"))


def test_router_package_imports_no_torch() -> None:
    code = ("import sys, pdserve.router, pdserve.router.router, pdserve.router.servicer; "
            "bad = sorted(m for m in ('torch', 'numpy', 'ray', 'pdserve.engine', 'pdserve.kvtransfer') "
            "if m in sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_split_cluster_holding_colocated_workers() -> None:
    """Colocated workers beside a split cluster's pools: the cluster is named apart (the planner's apply
    leaves it as it is), a router started again over it accepts it, and while no prefill worker is usable
    prompts go to the colocated workers, which need none, rather than wait for one."""
    from pdserve.planner.plan import configuration_name
    from pdserve.router.decode_policy import LeastLoadedDecodePolicy
    from pdserve.router.dispatch import Dispatcher
    from pdserve.router.inflight import InFlightTable
    from pdserve.router.plan_applier import ApplyConfig, PlanApplier
    from pdserve.router.prefill_policy import LeastQueuedPrefillPolicy

    assert configuration_name(prefill=1, decode=1, colocated=1) == "1P1D+1C"
    assert configuration_name(colocated=2) == "colocated x2" and configuration_name(prefill=1, decode=2) == "1P2D"
    applier = PlanApplier(ApplyConfig(confirmations=1, dwell_s=0))
    assert applier.decide({"status": "ok", "current": "1P1D+1C", "predictions": []}, 0.0) is None
    assert "mixed cluster keeps its configuration" in applier.status

    workers = _endpoints("prefill", "colocated")  # its decode worker became colocated
    router = Router(RouterConfig(), model="m", mode="disaggregated", workers=workers, starting=False)
    assert router.configuration_name() == "1P0D+1C"
    with pytest.raises(ConfigError, match="none with role decode"):
        Router(RouterConfig(), model="m", mode="disaggregated", workers=workers)  # a fresh cluster needs both

    both = _endpoints("prefill", "decode", "colocated")
    registry = Router(RouterConfig(), model="m", mode="disaggregated", workers=both).registry
    for state in registry.with_role(*WorkerRole):  # as if described, streams live
        state.healthy = state.stream_live = True
    dispatcher = Dispatcher(RouterConfig(), ServingMode.DISAGGREGATED, registry, InFlightTable(16),
                            LeastLoadedDecodePolicy(), LeastQueuedPrefillPolicy())
    streamers = registry.with_role(*ServingMode.DISAGGREGATED.stream_roles)
    assert dispatcher._without_prefill_pool(streamers, resumed=False) == streamers
    registry.mark_unhealthy("w0", "test: the prefill worker is down")
    assert [w.worker_id for w in dispatcher._without_prefill_pool(streamers, resumed=False)] == ["w2"]
    assert dispatcher._without_prefill_pool(streamers, resumed=True) == streamers  # resumed: no prefill needed

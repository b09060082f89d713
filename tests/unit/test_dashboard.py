"""The operator dashboard: its page, its JSON and its live events, after real requests through the router
(fake workers reporting telemetry); and the windowed figures it is computed from."""

from __future__ import annotations

import json

import aiohttp

from pdserve.cluster.cli import planner_line
from pdserve.router.config import RouterConfig, ServingMode
from pdserve.router.dashboard import _rates, dashboard_data
from pdserve.router.request_log import EndedRequest, RequestLog
from pdserve.rpc import api
from pdserve.v1 import pdserve_pb2
from tests.unit.test_router_fakes import FakeWorker, cluster, generate_request, run


def test_page_data_and_events_after_requests() -> None:
    async def scenario() -> None:
        workers = [FakeWorker("p0", "prefill", full_prefill_tokens_per_s=5000.0), FakeWorker("d0", "decode")]
        async with cluster(workers, mode="disaggregated", http_port=0, ttft_slo_ms=250.0, tpot_slo_ms=50.0) \
                as (router, stub):
            for i in range(4):
                await stub.GenerateUnary(generate_request([1, 2, 3, i], 6))
            async with aiohttp.ClientSession(f"http://127.0.0.1:{router.http_port}") as http:
                async with http.get("/dashboard") as r:
                    page = await r.text()
                    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
                async with http.get("/dashboard/data") as r:
                    data = await r.json()
                async with http.get("/dashboard/events") as r:
                    assert r.headers["Content-Type"] == "text/event-stream"
                    line = await r.content.readline()
                    pushed = json.loads(line.decode().removeprefix("data: "))
        for element in ('id="workers"', 'id="latency"', 'id="attainment"', 'id="sizing"', "EventSource"):
            assert element in page
        assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing from the internet
        assert data["model"] == "fake-model" and data["mode"] == "disaggregated"
        assert data["slo"] == {"ttft_ms": 250.0, "tpot_ms": 50.0}
        assert data["pools"] == {"prefill": {"workers": 1, "healthy": 1}, "decode": {"workers": 1, "healthy": 1}}
        assert {w["worker_id"]: w["gpu"]["available"] for w in data["workers"]} == {"p0": False, "d0": False}
        assert data["latency"]["ttft"]["p50"] is not None and data["latency"]["itl"]["p50"] is not None
        assert data["arrivals"]["prompt_len"]["p50"] == 4 and data["arrivals"]["output_len"]["p50"] == 6
        assert data["prefill"]["placements"] == {"prefill_worker": 4}
        assert data["sizing"]["pools"]["prefill"]["capacity_tokens_per_s"] == 5000.0
        last = [b for b in data["attainment"] if b["requests"]]
        assert sum(b["requests"] for b in last) == 4 and all(b["both"] == 1.0 for b in last)
        assert pushed["model"] == "fake-model" and len(pushed["workers"]) == 2
    run(scenario)


def test_attainment_and_bottleneck_from_windows() -> None:
    log = RequestLog()
    now = 10_000.0
    # two fast requests, one late first token, one slow decode: 2 of 4 meet both SLOs
    for ttft, e2e in ((0.1, 1.0), (0.1, 1.0), (0.5, 1.4), (0.1, 5.0)):
        log.add(EndedRequest(now - 5, e2e, 100, 11, ttft, "finished"))
    config = RouterConfig(ttft_slo_ms=250.0, tpot_slo_ms=200.0)
    snap = lambda seconds: {"engine": {"steps": {"mixed": {"count": 1, "seconds": seconds}}}}  # noqa: E731
    history = [(now - 20, {"p0": snap(0.0), "d0": snap(0.0)}), (now, {"p0": snap(18.0), "d0": snap(6.0)})]
    data = dashboard_data(model="m", mode=ServingMode.DISAGGREGATED, config=config, workers=[], telemetry={},
                          history=history, log=log, placements={}, now=now)
    [bucket] = [b for b in data["attainment"] if b["requests"]]
    assert (bucket["ttft"], bucket["tpot"], bucket["both"]) == (0.75, 0.75, 0.5)
    assert data["latency"]["tpot"]["p50"] is not None
    busy, _ = _rates(history, now)
    assert busy == {"p0": 0.9, "d0": 0.3}


def test_online_planner_recommends_on_live_traffic() -> None:
    from tests.unit.test_router_fakes import wait_until

    async def scenario() -> None:
        workers = [FakeWorker("p0", "prefill"), FakeWorker("d0", "decode")]
        async with cluster(workers, mode="disaggregated", http_port=0, ttft_slo_ms=250.0, tpot_slo_ms=50.0,
                           planner_mode="recommend", planner_interval_s=1.0) as (router, stub):
            assert router.planner is not None and router.configuration_name() == "1P1D"
            early = await router.planner.recommend()
            assert "planning needs 50" in early["status"]
            for i in range(60):
                await stub.GenerateUnary(generate_request([1, 2, 3, i % 7], 4))
            await router.telemetry.fresh(0.0)
            result = await router.planner.recommend()
            assert result["status"] == "ok" and result["current"] == "1P1D" and result["requests"] == 60
            assert [p["config"] for p in result["predictions"]] == ["colocated x2", "1P1D"]
            assert result["recommended"] in ("colocated x2", "1P1D")
            await wait_until(lambda: router.planner.latest.get("status") == "ok", what="a planning round")
            latest = router.planner.latest
            status = api.cluster_status_from_proto(await stub.ClusterStatus(pdserve_pb2.ClusterStatusRequest()))
            async with aiohttp.ClientSession(f"http://127.0.0.1:{router.http_port}") as http:
                async with http.get("/dashboard/data") as r:
                    data = await r.json()
                async with http.get("/metrics") as r:
                    text = await r.text()
        assert data["sizing"]["planner"]["recommended"] == result["recommended"]
        # the status RPC publishes the same round (what `pdserve status` prints)
        planner = status.planner
        assert planner is not None and (planner.mode, planner.status, planner.current) == ("recommend", "ok", "1P1D")
        assert planner.recommended == latest["recommended"] and planner.planned_at == latest["at"] > 0
        assert [(p.config, p.goodput_per_gpu) for p in planner.predictions] == [
            (p["config"], p["goodput_per_gpu"]) for p in latest["predictions"]]
        assert planner_line(planner).startswith(f"planner (recommend): recommends {planner.recommended} (now 1P1D); "
                                                "predicted goodput per GPU: colocated x2 ")
        assert f'pdserve:planner_recommended{{config="{result["recommended"]}",model_name="fake-model"}} 1.0' in text
        assert 'pdserve:planner_predicted_goodput_per_gpu{config="1P1D",model_name="fake-model"}' in text
        assert 'pdserve:planner_predicted_preemptions_per_request{config="1P1D",model_name="fake-model"} 0.0' in text
    run(scenario)


def test_planner_mode_is_validated() -> None:
    import pytest

    from pdserve.cluster.config import cluster_config_from_dict
    from pdserve.common.errors import ConfigError

    with pytest.raises(ConfigError, match="off, recommend, apply"):
        RouterConfig(planner_mode="act")
    with pytest.raises(ConfigError, match="set slo"):
        cluster_config_from_dict({"router": {"planner_mode": "recommend"}})
    config = cluster_config_from_dict({"router": {"planner_mode": "recommend"}, "slo": {"ttft_ms": 250, "tpot_ms": 20}})
    assert (config.router.planner_mode, config.router.tpot_slo_ms) == ("recommend", 20)


def test_a_request_log_takes_another_process_log_once_and_keeps_its_window() -> None:
    first, second = RequestLog(window_s=60.0), RequestLog(window_s=60.0)
    now = 10_000.0
    first.add(EndedRequest(now, 1.0, 10, 5, 0.1, "finished"))
    second.add(EndedRequest(now - 2, 1.0, 10, 5, 0.1, "finished"))
    second._gaps.append((now - 2, 0.02))
    records, gaps = second.after(0.0)
    first.merge(records, gaps)
    assert len(first.ended_since(now - 10)) == 2 and first.gaps_since(now - 10) == [0.02]
    last = max(r.ended_at for r in records)
    assert second.after(last) == ([], [])  # what was taken is not taken again
    second.add(EndedRequest(now + 1, 1.0, 10, 5, 0.1, "finished"))
    records, _ = second.after(last)
    assert [r.ended_at for r in records] == [now + 1]
    first.merge([EndedRequest(now + 100, 1.0, 10, 5, 0.1, "finished")], [])  # the window moves with it
    assert [r.ended_at for r in first.ended_since(0.0)] == [now + 100]

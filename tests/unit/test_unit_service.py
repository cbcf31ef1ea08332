"""`ringwatch serve` pieces without a cluster: ingest of real agent pushes, the analysis round,
the JSON API, runtime control and its token, `ringwatch status` lines."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from ringwatch.service._cli import status_lines
from ringwatch.service._jobs import Jobs
from ringwatch.service._service import Service, ServiceConfig

from pushes import WALL
from pushes import agent_push as _push


def test_ingest_keeps_steps_frontier_and_hosts():
    jobs = Jobs(keep_steps=100)
    assert jobs.ingest(_push("j1", late_rank=None), WALL) == 0
    jl = jobs.jobs["j1"]
    assert sorted(jl.ranks) == [0, 1, 2, 3]
    assert jl.ranks[3].host == "host1" and jl.ranks[0].completed_seq == {"0": 80}
    # a push carries every finished step of each rank it has not sent (up to PUSH_STEPS)
    assert jl.max_step == 39 and len(jl.steps) == 4 * 40 and min(k[2] for k in jl.steps) == 0
    assert jl.groups["0"] == ("0-3", 4)


def test_ingest_rejects_a_rank_that_is_not_a_number():
    req = _push("j1", late_rank=None, steps=range(0, 3))
    for rm in req.resource_metrics:
        for kv in rm.resource.attributes:
            if kv.key == "ringwatch.rank":
                kv.value.string_value = "three"
    jobs = Jobs()
    assert jobs.ingest(req, WALL) > 0
    assert jobs.jobs == {}


def test_the_pipeline_stages_come_from_the_send_recv_peers_the_agents_report():
    from ringwatch.service._analysis import live_stages

    from pushes import rank_push

    def p2p(peer, first):
        return ("ringwatch.p2p.count", 5, {"ringwatch.p2p.peer": peer,
                                           "ringwatch.p2p.first_op": first})

    jobs = Jobs()
    # two pipelines of three stages: 0 -> 2 -> 4 and 1 -> 3 -> 5; the first stage sends first
    chains = {0: [2], 1: [3], 2: [0, 4], 3: [1, 5], 4: [2], 5: [3]}
    for rank, peers in chains.items():
        first = "send" if rank < 2 else "recv"
        assert jobs.ingest(rank_push("j", rank, [p2p(q, first) for q in peers]), WALL) == 0
    assert live_stages(jobs.snapshot("j")) == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    # a bad peer or op is refused and counted; the stages stand
    bad = [p2p(-1, "send"), p2p("x", "send"), p2p(3, "drop"), p2p(1 << 40, "send")]
    assert jobs.ingest(rank_push("j", 0, bad), WALL) == 4
    assert live_stages(jobs.snapshot("j")) == {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}
    # no more peers than a bound per rank
    many = rank_push("j", 7, [p2p(q, "send") for q in range(100, 200)])
    assert jobs.ingest(many, WALL) == 100 - 64
    # without send/recv there is no pipeline: one class
    from ringwatch.service._jobs import JobLive

    assert live_stages(JobLive(job="ddp")) is None


def test_a_round_names_the_late_rank_and_a_healthy_job_nothing():
    svc = Service(ServiceConfig(state_dir=None))
    svc.jobs.ingest(_push("bad", late_rank=2), WALL)
    svc.jobs.ingest(_push("good", late_rank=None), WALL)
    changes = svc.analyze_once()
    opened = [c.tracked.finding for c in changes if c.what == "opened"]
    assert [(f.kind, f.ranks, f.hosts) for f in opened] == [("straggler", (2,), ("host1",))]
    assert svc.store.current("good") == []
    svc.control(pause=["straggler"])
    svc.analyze_once()
    assert svc.settings()["detectors"]["straggler"] is False


@pytest.fixture
def running(tmp_path):
    svc = Service(ServiceConfig(otlp_listen="127.0.0.1:0", api_listen="127.0.0.1:0",
                                state_dir=tmp_path / "state", token="t0k", window_s=60))
    svc.start()
    yield svc
    svc.stop()


def _http(svc, path, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{svc.api.port}{path}",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_api_control_findings_and_status(running):
    svc = running
    svc.jobs.ingest(_push("bad", late_rank=1), WALL)
    svc.analyze_once()
    code, body = _http(svc, "/api/v1/findings?state=open")
    assert code == 200 and [t["finding"]["ranks"] for t in body["findings"]] == [[1]]
    code, jobs = _http(svc, "/api/v1/jobs")
    assert jobs["jobs"][0]["open_findings"] == 1 and jobs["jobs"][0]["ranks"] == 4
    lines = status_lines(body["findings"], jobs["jobs"])
    assert lines[0].startswith("job bad: 4 rank(s) on 2 host(s), step 39, 1 open finding(s)")
    assert "straggler  compute straggler        1" in lines[-1]
    assert _http(svc, "/api/v1/control", {"pause": ["hang"]})[0] == 401
    code, settings = _http(svc, "/api/v1/control", {"pause": ["hang"],
                                                      "thresholds": {"min_stall_s": 8}},
                           token="t0k")
    assert code == 200 and settings["detectors"]["hang"] is False
    assert settings["thresholds"]["min_stall_s"] == 8
    assert _http(svc, "/api/v1/control", {"pause": ["nope"]}, token="t0k")[0] == 400
    assert _http(svc, "/api/v1/control", {"thresholds": {"min_stall_s": -1}},
                 token="t0k")[0] == 400
    fid = body["findings"][0]["id"]
    code, t = _http(svc, f"/api/v1/findings/{fid}/resolve", {}, token="t0k")
    assert code == 200 and t["state"] == "resolved"
    assert _http(svc, "/api/v1/nothing")[0] == 404
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.api.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "ringwatch_serve_analysis_rounds_total 1.0" in text


def test_a_service_that_joins_a_job_at_step_500_baselines_on_what_it_saw():
    svc = Service(ServiceConfig(state_dir=None))
    for first in (500, 532):  # two pushes of 32 steps; the rank is late from step 545 on
        svc.jobs.ingest(_push("mid", late_rank=3, steps=range(first, first + 32),
                              late_from=545), WALL)
        svc.analyze_once()
    (t,) = svc.store.current("mid")
    assert (t.finding.kind, t.finding.ranks) == ("straggler", (3,))
    assert 545 <= t.finding.since_step <= 548


def test_a_straggler_that_a_slow_link_explains_later_is_resolved():
    from ringwatch.analyzers._findings import Finding

    svc = Service(ServiceConfig(state_dir=None))
    s = Finding("straggler", "compute straggler", (2,), ("host2",), since_step=27)
    svc.store.update("j", [s])
    link = Finding("slow_link", "slow communication", (0, 2, 3), ("host2",), since_step=26)
    svc.store.update("j", [link])
    svc._superseded("j", [link])
    assert [t.finding.kind for t in svc.store.current("j", state="open")] == ["slow_link"]


def test_insignificant_stragglers_and_unplaced_links_are_not_shown():
    from ringwatch.analyzers._findings import Finding
    from ringwatch.service._analysis import without_unplaced_links

    svc = Service(ServiceConfig(state_dir=None))
    # 4 ms late in 100 ms steps: above the noise floor (2 ms), below 5% of the step
    svc.jobs.ingest(_push("small", late_rank=2, late_ms=4.0), WALL)
    svc.analyze_once()
    assert svc.store.current("small") == []
    svc.control(thresholds={"min_gain_share": 0})
    svc.analyze_once()
    assert [t.finding.ranks for t in svc.store.current("small")] == [(2,)]
    s = Finding("straggler", "compute straggler", (2,), ("host1",), since_step=31)
    wide = Finding("slow_link", "slow communication", (0, 1, 2, 3), ("host0", "host1"),
                   since_step=82)
    placed = Finding("slow_link", "slow communication", (2, 3), ("host1",), since_step=82)
    assert without_unplaced_links((wide, placed), [s]) == (placed,)


def test_max_jobs_bounds_the_jobs_held():
    svc = Service(ServiceConfig(state_dir=None, max_jobs=2))
    for i, job in enumerate(("a", "b", "c")):
        svc.jobs.ingest(_push(job, late_rank=None, steps=range(0, 3)), WALL + i)
    assert len(svc.jobs.jobs) == 2 and "c" in svc.jobs.jobs


def test_a_hiccup_is_counted_per_rank_not_left_open():
    from prometheus_client import CollectorRegistry, generate_latest

    from ringwatch.service._api import ServiceCollector

    svc = Service(ServiceConfig(state_dir=None))
    # rank 1 late for steps 25-29 only, then on time again up to step 39
    svc.jobs.ingest(_push("hic", late_rank=1, steps=range(0, 40), late_until=30), WALL)
    svc.analyze_once()
    # a hiccup is no finding, open or resolved, as in the post-mortem report
    assert svc.store.current("hic") == [] and svc.store.history("hic") == []
    others = {("hic", 0, "host0"): 0, ("hic", 2, "host1"): 0, ("hic", 3, "host1"): 0}  # from 0
    assert svc.hiccups == {("hic", 1, "host0"): 1, **others}
    svc.analyze_once()  # the same ended episode seen again: not counted twice
    assert svc.hiccups == {("hic", 1, "host0"): 1, **others}
    reg = CollectorRegistry()
    reg.register(ServiceCollector(svc))
    text = generate_latest(reg).decode()
    assert 'ringwatch_straggler_hiccups_total{host="host0",job="hic",rank="1"} 1.0' in text
    assert 'ringwatch_straggler_hiccups_total{host="host0",job="hic",rank="0"} 0.0' in text

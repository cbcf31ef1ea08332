"""`ringwatch serve` against hostile pushes: out-of-range and non-finite values dropped and
counted while the valid points of the same push are kept, the step window held by the job's
ranks (not by one forged claim), evicted jobs leaving nothing behind, label lengths bounded."""

from __future__ import annotations

import http.client
import json
import math

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from prometheus_client import CollectorRegistry, generate_latest

from ringwatch.service._api import ServiceCollector
from ringwatch.service._bounds import MAX_STEP
from ringwatch.service._jobs import Jobs
from ringwatch.service._service import Service, ServiceConfig

from pushes import WALL, agent_push, merged, only_ranks, rank_push, step_points

S = 1_000_000_000
SEQ = "ringwatch.collective.started_seq"
PG = {"ringwatch.pg": "0"}


def _bad_points(job: str) -> tuple[object, int]:
    """A push of bad points for ``job``'s ranks (and how many): each was seen in a trial."""
    pts = [
        (SEQ, 1e300, {"ringwatch.pg": "unused"}),  # failed every analysis round
        (SEQ, 2.5, PG),  # a sequence number that is not an integer
        ("ringwatch.collective.completed_seq", -1, PG),
        ("ringwatch.step.collective.time", math.nan, {"ringwatch.step": 39, **PG}),
        ("ringwatch.step.collective.io", math.inf, {"ringwatch.step": 39, **PG}),
        ("ringwatch.step.collective.count", 2, {"ringwatch.step": 10 ** 15, **PG}),
        ("ringwatch.step.collective.count", 2, {"ringwatch.step": -3, **PG}),
        ("ringwatch.step.collective.count", 2, {"ringwatch.step": "7x", **PG}),
        ("ringwatch.step.collective.count", 2, {"ringwatch.step": 39, "ringwatch.pg": "g" * 300}),
        ("ringwatch.step.collective.start", -math.inf, {"ringwatch.step": 39, **PG}),
        ("ringwatch.rank.log_age", math.nan, {}),
        ("ringwatch.rank.step", 1e300, {}),
        ("ringwatch.collective.pending", math.inf, PG),
    ]
    return rank_push(job, 0, pts, host="host0"), len(pts)


def test_bad_values_are_dropped_and_counted_and_the_straggler_still_found():
    svc = Service(ServiceConfig(state_dir=None))
    bad, n_bad = _bad_points("j")
    assert svc.jobs.ingest(merged(agent_push("j", late_rank=2), bad), WALL) == n_bad
    jl = svc.jobs.jobs["j"]
    assert jl.max_step == 39 and len(jl.steps) == 4 * 40  # every valid step row kept
    assert jl.ranks[0].started_seq == {"0": 80}  # not the 1e300 on "unused"
    assert jl.steps[(1, "0", 39)]["busy_s"] > 0  # the NaN for it was dropped, not applied
    assert jl.ranks[0].log_age_s is None and jl.ranks[0].step == 40
    changes = svc.analyze_once()
    assert svc.analysis_errors == 0
    opened = [c.tracked.finding for c in changes if c.what == "opened"]
    assert [(f.kind, f.ranks) for f in opened] == [("straggler", (2,))]


def test_a_push_with_nan_is_200_with_the_rejected_count_over_protobuf_and_json():
    svc = Service(ServiceConfig(otlp_listen="127.0.0.1:0", api_listen="127.0.0.1:0",
                                state_dir=None, window_s=3600)).start()
    try:
        bad, n_bad = _bad_points("j")
        good = agent_push("j", late_rank=None, steps=range(0, 3))
        for ctype, body in (
                ("application/x-protobuf", merged(good, bad).SerializeToString()),
                ("application/json", json_format.MessageToJson(merged(bad, good)).encode())):
            assert b"NaN" in body or ctype.endswith("protobuf")
            conn = http.client.HTTPConnection("127.0.0.1", svc.receiver.port, timeout=10)
            conn.request("POST", "/v1/metrics", body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            out = resp.read()
            conn.close()
            assert resp.status == 200, out
            rejected = (ExportMetricsServiceResponse.FromString(out).partial_success
                        .rejected_data_points if ctype.endswith("protobuf")
                        else int(json.loads(out)["partialSuccess"]["rejectedDataPoints"]))
            assert rejected == n_bad
        st = svc.receiver.stats()
        assert st.rejected_total == 2 * n_bad and st.handler_errors_total == 0
        assert set(st.requests_total) == {200}
        assert sorted(svc.jobs.jobs["j"].ranks) == [0, 1, 2, 3]  # the valid ranks are in
    finally:
        svc.stop()


def test_a_forged_far_step_does_not_move_the_window():
    jobs = Jobs(keep_steps=100)
    assert jobs.ingest(agent_push("j", late_rank=None, steps=range(0, 40)), WALL) == 0
    far = 10 ** 12  # within the step bound, far ahead of the job
    assert far < MAX_STEP
    forged_rank = rank_push("j", 9, step_points(far) + step_points(far + 1))
    forged_real = rank_push("j", 3, step_points(far), host="host1")  # a real rank's name
    assert jobs.ingest(forged_rank, WALL + S) == 10
    assert jobs.ingest(forged_real, WALL + S) == 5
    jl = jobs.jobs["j"]
    assert jl.max_step == 39 and max(k[2] for k in jl.steps) == 39
    assert jobs.ingest(agent_push("j", late_rank=None, steps=range(40, 72)), WALL + 2 * S) == 0
    jl = jobs.jobs["j"]
    assert jl.max_step == 71 and {k[2] for k in jl.steps} >= set(range(40, 72))
    _, rows, _ = jobs.take("j")
    assert max(k[2] for k, _ in rows) == 71 and {k[0] for k, _ in rows} == {0, 1, 2, 3}


def test_a_job_resumed_at_step_50000_is_taken_and_its_straggler_found():
    svc = Service(ServiceConfig(state_dir=None))
    for first in (50_000, 50_032):
        assert svc.jobs.ingest(agent_push("resumed", late_rank=1,
                                          steps=range(first, first + 32),
                                          late_from=50_045), WALL) == 0
        svc.analyze_once()
    assert svc.jobs.jobs["resumed"].max_step == 50_063
    (t,) = svc.store.current("resumed")
    assert (t.finding.kind, t.finding.ranks) == ("straggler", (1,))
    assert 50_045 <= t.finding.since_step <= 50_048


def test_a_job_that_restarts_its_numbering_moves_its_window_back():
    jobs = Jobs(keep_steps=100)
    jobs.ingest(agent_push("j", late_rank=None, steps=range(5000, 5040)), WALL)
    node_a = only_ranks(agent_push("j", late_rank=None, steps=range(0, 20)), {0, 1})
    node_b = only_ranks(agent_push("j", late_rank=None, steps=range(0, 20)), {2, 3})
    jobs.ingest(node_a, WALL + S)  # half the ranks restarted: the lower median follows
    assert jobs.jobs["j"].max_step == 19
    jobs.ingest(node_b, WALL + 2 * S)
    jl = jobs.jobs["j"]
    assert jl.max_step == 19
    assert {k[2] for k in jl.steps} == set(range(0, 20))  # the old run's rows trimmed
    _, rows, _ = jobs.take("j")
    assert len(rows) == 4 * 20


def test_ranks_that_stopped_pushing_do_not_hold_the_window():
    jobs = Jobs(keep_steps=100, claim_ttl_s=30)
    jobs.ingest(agent_push("j", late_rank=None, steps=range(0, 32)), WALL)
    later = only_ranks(agent_push("j", late_rank=None, steps=range(32, 64)), {0, 1})
    jobs.ingest(later, WALL + 40 * S)  # ranks 2, 3 silent for 40 s (their agent died)
    assert jobs.jobs["j"].max_step == 63
    _, rows, _ = jobs.take("j")
    assert max(k[2] for k, _ in rows) == 63


def test_bad_identities_drop_their_resource_and_count_every_point():
    jobs = Jobs()
    pts = step_points(1)
    cases = [
        ("x" * (1 << 20), 0, "h"),  # a 1 MiB job id
        ("j", 0, "h" * 257),  # a host name over 256 characters
        ("j", -1, "h"), ("j", 1 << 20, "h"), ("j", 2.5, "h"), ("j", True, "h"),
        ("j", "zero", "h"),
    ]
    for job, rank, host in cases:
        assert jobs.ingest(rank_push(job, rank, pts, host=host), WALL) == len(pts), (rank,)
    assert jobs.jobs == {}
    # at the bounds: accepted
    assert jobs.ingest(rank_push("j" * 256, (1 << 20) - 1, pts, host="h" * 256), WALL) == 0
    assert jobs.ingest(rank_push("j", "7", pts, host="h"), WALL) == 0
    assert sorted(jobs.jobs["j"].ranks) == [7]


def test_an_evicted_job_leaves_no_series_findings_or_state():
    svc = Service(ServiceConfig(state_dir=None, max_jobs=2))
    for i in range(5):
        svc.jobs.ingest(agent_push(f"job{i}", late_rank=1), WALL + i * S)
        svc.analyze_once()
    held = {"job3", "job4"}
    assert set(svc.jobs.jobs) == held and svc.jobs.evicted_total == 3
    assert set(svc.live) == held and set(svc.last_lag_s) == held
    assert set(svc.last_round_s) == held
    assert {k[0] for k in svc.hiccups} <= held
    assert set(svc.store.jobs()) == held
    reg = CollectorRegistry()
    reg.register(ServiceCollector(svc))
    text = generate_latest(reg).decode()
    assert 'job="job4"' in text
    for gone in ("job0", "job1", "job2"):
        assert f'job="{gone}"' not in text, gone
    assert "ringwatch_serve_jobs_evicted_total 3.0" in text


def test_step_and_blocked_times_are_checked_windowed_and_handed_over_once():
    jobs = Jobs(keep_steps=100)
    assert jobs.ingest(agent_push("j", late_rank=None, steps=range(0, 40)), WALL) == 0

    def work(step, step_s, blocked_s, rank=0):
        attrs = {"ringwatch.step": step}
        return rank_push("j", rank, [("ringwatch.step.duration", step_s, attrs),
                                     ("ringwatch.step.blocked", blocked_s, attrs)],
                         host="host0")

    assert jobs.ingest(work(30, 0.2, 0.05), WALL) == 0
    # a negative time, a non-number step, a step far ahead of the job: refused, counted
    assert jobs.ingest(work(31, -1.0, 0.05), WALL) == 1
    assert jobs.ingest(work("x", 0.2, float("nan")), WALL) == 2
    assert jobs.ingest(work(10 ** 6, 0.2, 0.1), WALL) == 2
    assert jobs.ingest(work(32, 0.2, 0.1, rank=1), WALL) == 0
    _, _, got = jobs.take("j")
    assert sorted(got) == [((0, 30), {"step_s": 0.2, "blocked_s": 0.05}),
                           ((1, 32), {"step_s": 0.2, "blocked_s": 0.1})]
    assert jobs.take("j")[2] == []  # once
    # the half-received step 31 (its blocked time alone) never goes out
    assert (0, 31) in jobs.jobs["j"].work and jobs.jobs["j"].work[(0, 31)] == {
        "blocked_s": 0.05}

"""Every torch.distributed collective and p2p API, sync and async, on the world group and on
sub-groups (tests/jobs/all_apis.py), captured zero-code and with attach()."""

from __future__ import annotations

import json
from collections import Counter

import polars as pl
import pytest

from ringwatch._logs import open_job
from ringwatch.analyzers import check_consistency, compare_flight_recorder

from jobtools import JOBS, ringwatch_cmd, run_job, torchrun_cmd


@pytest.fixture(scope="module", params=["ringwatch_run", "attach"])
def api_run(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"apis_{request.param}")
    script = [str(JOBS / "all_apis.py"), "--expect", "expect.json"]
    if request.param == "attach":
        cmd = torchrun_cmd(4, [*script, "--attach", "logs"])
    else:
        cmd = ringwatch_cmd("run", "--log-dir", "logs", "--", *torchrun_cmd(4, script))
    rc, out = run_job(cmd, cwd=d)
    assert rc == 0, out
    job = open_job(d / "logs")
    expected = json.loads((d / "expect.json").read_text())
    return job, job.events(), expected


def test_consistent_across_ranks_and_groups(api_run):
    job, ev, _ = api_run
    assert job.problems == []
    report = check_consistency(ev)
    assert report.ok, report.problems
    groups = {g.pg: g.ranks for g in report.groups}
    assert sorted(groups.values()) == [(0, 1), (0, 1, 2, 3), (2, 3)]


def test_matches_flight_recorder(api_run):
    job, ev, _ = api_run
    for rank in job.ranks:
        cmp = compare_flight_recorder(ev.filter(pl.col("rank") == rank), job.flight_recorder(rank))
        assert cmp.ok, (rank, cmp)
        assert cmp.matched >= 30


def test_every_issued_api_was_captured(api_run):
    _, ev, expected = api_run
    for rank, issued in enumerate(expected):
        got = Counter(ev.filter(pl.col("rank") == rank)
                      .select("api", "op", "async_op").iter_rows())
        want = Counter((api, op, bool(a)) for api, op, a in issued)
        missing = want - got
        assert not missing, f"rank {rank} missed {dict(missing)}"


def test_each_op_and_both_modes_present(api_run):
    _, ev, _ = api_run
    ops = set(ev["op"].unique())
    assert {"all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
            "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
            "barrier", "send", "recv", "all_reduce_coalesced", "monitored_barrier"} <= ops
    hooked = ev.filter(pl.col("api") != "flight_recorder")
    for op in ("all_reduce", "broadcast", "gather", "scatter", "all_to_all", "barrier"):
        modes = set(hooked.filter(pl.col("op") == op)["async_op"].unique())
        assert modes == {False, True}, op


def test_times_status_and_peers(api_run):
    _, ev, _ = api_run
    ev = ev.filter(pl.col("api") != "flight_recorder")  # recovered rows carry no timings
    assert ev["status"].unique().to_list() == ["ok"]
    assert (ev["duration_ns"] > 0).all()
    assert (ev["t_end_ns"] >= ev["t_start_ns"]).all()
    assert (ev["t_start_ns"] >= ev["t_issue_ns"]).all()
    assert set(ev["end_source"].unique()) <= {"wait", "future", "poll"}
    p2p = ev.filter(pl.col("is_p2p"))
    assert p2p["peer"].null_count() == 0 and p2p["seq"].null_count() == 0
    coll = ev.filter(~pl.col("is_p2p"))
    assert coll["peer"].null_count() == coll.height
    rooted = ev.filter(pl.col("op").is_in(["broadcast", "reduce", "gather", "scatter"]))
    assert rooted["root"].null_count() == 0


def test_sub_group_rows_name_their_members(api_run):
    _, ev, _ = api_run
    sub = ev.filter(pl.col("pg_ranks") == "0-1")
    assert set(sub["rank"].unique()) == {0, 1}
    assert set(sub["group_rank"].unique()) == {0, 1}
    pair = ev.filter(pl.col("pg_ranks") == "2-3")
    assert set(pair["rank"].unique()) == {2, 3}
    assert set(pair["pg_size"].unique()) == {2}


def test_functional_collectives_recovered_from_the_flight_recorder(api_run):
    _, ev, _ = api_run
    fr = ev.filter(pl.col("api") == "flight_recorder")
    for rank in range(4):
        mine = fr.filter(pl.col("rank") == rank)
        assert sorted(mine["op"].to_list()) == ["all_gather", "all_reduce"], rank
        assert mine["status"].unique().to_list() == ["unknown"]
        assert sorted(mine["nbytes_in"].to_list()) == [8, 16]

"""A real 4-rank DDP job on Gloo, captured zero-code and with attach(): every bucket of every
step, the same list on every rank, one to one with PyTorch's Flight Recorder."""

from __future__ import annotations

import polars as pl
import pytest

from ringwatch._logs import open_job
from ringwatch.analyzers import check_consistency, compare_flight_recorder

from jobtools import read_json_line, run_job, torchrun_cmd

STEPS = 20


@pytest.fixture(scope="module")
def attach_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_attach")
    rc, out = run_job(torchrun_cmd(4, ["-m", "ringwatch.cluster._job", "--steps", str(STEPS),
                                       "--attach", "logs", "--result", "result.json"]), cwd=d)
    assert rc == 0, out
    return d / "logs", read_json_line(d / "result.json"), out


@pytest.fixture(params=["ringwatch_run", "attach"])
def captured(request, ddp_run, attach_run):
    return ddp_run if request.param == "ringwatch_run" else attach_run


def test_every_rank_logged_and_readable(captured):
    log_dir, result, _ = captured
    job = open_job(log_dir)
    assert sorted(job.ranks) == [0, 1, 2, 3]
    ev = job.events()
    assert job.problems == []
    assert ev["world_size"].unique().to_list() == [4]
    assert ev["job_id"].n_unique() == 1
    assert set(ev["backend"].unique()) == {"gloo"}
    meta = job.meta()
    assert all(m["final"] and m["counters"]["dropped"] == 0 for m in meta.values())
    assert result["buckets"] >= 3, "the job must have several buckets to test bucket capture"


def test_same_ordered_list_on_every_rank(captured):
    log_dir, _, _ = captured
    ev = open_job(log_dir).events()
    report = check_consistency(ev)
    assert report.ok, report.problems
    lists = {r: g.sort("idx").select("pg", "seq", "op", "nbytes").rows()
             for (r,), g in ev.group_by("rank")}
    assert len({tuple(v) for v in lists.values()}) == 1


def test_all_reduce_per_step_equals_bucket_count(captured):
    log_dir, result, _ = captured
    ev = open_job(log_dir).events()
    ddp = ev.filter((pl.col("api") == "ddp") & (pl.col("op") == "all_reduce"))
    per = ddp.group_by("rank", "step").len().sort("rank", "step")
    assert per["step"].n_unique() == STEPS
    first = per.filter(pl.col("step") == 0)["len"].unique().to_list()
    later = per.filter(pl.col("step") > 0)["len"].unique().to_list()
    assert first == [result["buckets_first_step"]]  # before DDP rebuilds its buckets
    assert later == [result["buckets"]]
    assert ddp["status"].unique().to_list() == ["ok"]
    assert ddp["end_source"].unique().to_list() == ["future"]
    assert (ddp["duration_ns"] > 0).all()
    assert (ddp["t_end_ns"] >= ddp["t_start_ns"]).all()


def test_matches_flight_recorder_one_to_one(captured):
    log_dir, result, _ = captured
    job = open_job(log_dir)
    ev = job.events()
    for rank in job.ranks:
        dump = job.flight_recorder(rank)
        assert dump is not None
        cmp = compare_flight_recorder(ev.filter(pl.col("rank") == rank), dump)
        assert cmp.ok, cmp
        assert cmp.matched >= STEPS * result["buckets"]


def test_collectives_issued_from_cpp_outside_hooks_are_recovered(captured):
    """DDP's constructor and bucket rebuild broadcast from C++, before/outside the comm hook:
    they come back from the Flight Recorder, in place, marked as such."""
    log_dir, _, _ = captured
    ev = open_job(log_dir).events()
    fr = ev.filter(pl.col("api") == "flight_recorder")
    assert fr.height > 0
    assert set(fr["op"].unique()) <= {"broadcast", "all_gather"}
    assert fr["status"].unique().to_list() == ["unknown"]


def test_ringwatch_run_reports_the_job(ddp_run):
    log_dir, _, out = ddp_run
    job = open_job(log_dir)
    assert f"[ringwatch] job {job.job_id}: 4 rank(s)" in out

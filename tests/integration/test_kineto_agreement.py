"""Profiler traces and ringwatch's own logs of the same run agree: a straggler run on the local
cluster (4 ranks on loopback, so no root is needed), traced with ``torch.profiler``, gives the
same straggler verdict of ``ringwatch analyze``, the same rank named, from its traces as from
its logs.
``benchmarks/kineto_agreement.py`` does the same with 16 ranks."""

from __future__ import annotations

import polars as pl

from ringwatch._analyze import analyze_job
from ringwatch._logs import open_job
from ringwatch.cluster import ClusterSpec, FaultSpec, run_cluster
from ringwatch.inputs import open_sources


def _stragglers(report: dict) -> set[int]:
    return {r for f in report["_findings"] if f.kind == "straggler" for r in f.ranks}


def test_traces_and_logs_of_a_straggler_run_name_the_same_rank(tmp_path):
    traces = tmp_path / "run" / "traces"
    spec = ClusterSpec(run_dir=tmp_path / "run", nproc=4, hosts=2, steps=60, netns="off",
                       job_args=("--batch", "64", "--step-sleep-ms", "60",
                                 "--profile-dir", str(traces)))
    # A compute straggler (3x the work from step 20): the SIGSTOP duty cycle, with the
    # profiler's own load on two busy cores, is read now and then as insignificant.
    result = run_cluster(spec, FaultSpec(kind="straggler", rank=1, at_step=20,
                                         straggler_mode="work", factor=3.0))
    assert result.ok, result
    assert sorted(p.name for p in traces.iterdir()) == [f"rank-{r}.json.gz" for r in range(4)]

    from_logs = analyze_job(open_job(result.log_dir, result.job_id))
    opened = open_sources([traces])
    assert [s.kind for s in opened.sources] == ["profiler traces"], opened
    source = opened.sources[0]
    from_traces = analyze_job(source)
    assert from_traces["unreadable"] == [], from_traces["unreadable"]
    assert _stragglers(from_logs) == {1}, from_logs["findings"]
    assert _stragglers(from_traces) == {1}, from_traces["findings"]

    # The traces hold the gradient all-reduces of the logs: per rank, the same ones in
    # order, step by step (DDP's construction, before the profiler starts, is in the logs
    # alone: recovered from the Flight Recorder, with no step).
    logs = open_job(result.log_dir, result.job_id).events()
    ev = source.events()
    assert sorted(ev["rank"].unique()) == [0, 1, 2, 3]
    for rank in range(4):
        mine = ev.filter((pl.col("rank") == rank) & (pl.col("op") == "all_reduce")
                         & pl.col("step").is_not_null()).sort("idx")
        steps = mine["step"].unique().implode()
        theirs = logs.filter((pl.col("rank") == rank) & (pl.col("op") == "all_reduce")
                             & pl.col("step").is_in(steps)).sort("idx")
        assert mine.height > 50 * 6, mine.height  # 6 buckets a step
        assert mine["step"].to_list() == theirs["step"].to_list(), rank
        assert mine["nbytes"].to_list() == theirs["nbytes"].to_list(), rank

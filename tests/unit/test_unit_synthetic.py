"""The scale benchmark's generator: schema, timing, faults, and logs the real reader reads."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import polars as pl
import pytest

from ringwatch._logs import META_FILE, PENDING_FILE, open_job
from ringwatch._schema import STATUSES, parse_ranks, polars_schema

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "synthetic.py"
_spec = importlib.util.spec_from_file_location("ringwatch_bench_synthetic", _PATH)
synthetic = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = synthetic  # dataclasses look their module up while building
_spec.loader.exec_module(synthetic)

SyntheticJob, job_frame, write_logs = synthetic.SyntheticJob, synthetic.job_frame, \
    synthetic.write_logs


def test_schema_columns_and_dtypes():
    job = SyntheticJob(ranks=16, steps=4, tp_size=4)
    df = job_frame(job)
    assert df.schema == pl.Schema(polars_schema())
    assert df.height == 16 * 4 * job.slots_per_step
    assert set(df["status"].unique()) == {"ok"} and set(df["status"]) <= set(STATUSES)
    # non-nullable columns are filled
    from ringwatch._schema import COLUMNS

    assert all(df[c.name].null_count() == 0 for c in COLUMNS if not c.nullable)


def test_structure_and_clocks_are_consistent():
    job = SyntheticJob(ranks=16, steps=5, tp_size=4, ranks_per_host=8)
    df = job_frame(job)
    # hosts of 8, local ranks 0..7
    hosts = df.group_by("host").agg(pl.col("rank").n_unique(), pl.col("local_rank").max())
    assert hosts.height == 2 and set(hosts["rank"]) == {8} and set(hosts["local_rank"]) == {7}
    # idx is 0.. per rank; seq rises by one per collective of each group on every member
    per = df.group_by("rank").agg(pl.col("idx").min().alias("lo"), pl.col("idx").max(),
                                  pl.len())
    assert (per["lo"] == 0).all() and (per["idx"] == per["len"] - 1).all()
    seqs = df.sort("idx").group_by("rank", "pg").agg(pl.col("seq"), pl.col("pg_ranks").first(),
                                                     pl.col("pg_size").first())
    for r in seqs.iter_rows(named=True):
        assert r["seq"] == list(range(1, len(r["seq"]) + 1))
        assert r["rank"] in parse_ranks(r["pg_ranks"]) and len(parse_ranks(r["pg_ranks"])) \
            == r["pg_size"]
    # every member records each collective once: (pg, seq) groups have pg_size rows
    n = df.group_by("pg", "seq").agg(pl.len(), pl.col("pg_size").first())
    assert (n["len"] == n["pg_size"]).all()
    # durations from the monotonic clock; the wall clock differs from it by a per-host constant
    assert (df["duration_ns"] == df["mono_end_ns"] - df["mono_start_ns"]).all()
    assert (df["t_end_ns"] - df["t_start_ns"] == df["duration_ns"]).all()
    assert (df["duration_ns"] > 0).all()
    off = df.group_by("host").agg((pl.col("t_start_ns") - pl.col("mono_start_ns")).n_unique())
    assert (off["t_start_ns"] == 1).all()
    # a rank's collectives do not overlap and follow its issue order
    gaps = df.sort("rank", "idx").with_columns(
        (pl.col("mono_start_ns") - pl.col("mono_end_ns").shift(1).over("rank")).alias("gap"))
    assert (gaps["gap"].drop_nulls() > 0).all()
    # steps: one value per slots_per_step consecutive collectives
    assert df.filter(pl.col("rank") == 3).sort("idx")["step"].to_list() == [
        i // job.slots_per_step for i in range(job.slots)]


def test_the_straggler_has_the_shortest_durations():
    job = SyntheticJob(ranks=16, steps=12, tp_size=4, straggler=6, straggler_step=5,
                       straggler_ms=4.0, seed=3)
    df = job_frame(job).filter(pl.col("pg") == "0")
    after = df.filter(pl.col("step") >= 5)
    # at every world collective from the onset, rank 6 left with the others but came last
    short = after.filter(pl.col("duration_ns") == pl.col("duration_ns").min().over("seq"))
    assert set(short["rank"]) == {6}
    mean = after.group_by("rank").agg(pl.col("duration_ns").mean()).sort("duration_ns")
    assert mean["rank"][0] == 6
    # its peers waited about the straggler's extra compute for it
    peers = after.filter(pl.col("rank") != 6)["duration_ns"].median()
    assert peers - mean["duration_ns"][0] > 3.0e6
    # before the onset nobody stands out that way
    before = df.filter(pl.col("step") < 5)
    first = before.filter(pl.col("duration_ns") == pl.col("duration_ns").min().over("seq"))
    assert first["rank"].n_unique() > 1


def test_the_hang_leaves_pending_rows_and_a_missing_rank():
    job = SyntheticJob(ranks=16, steps=10, tp_size=4, hang=9, hang_step=6)
    df = job_frame(job)
    pend = df.filter(pl.col("status") == "pending")
    assert sorted(pend["rank"]) == [r for r in range(16) if r != 9]
    assert pend["mono_end_ns"].null_count() == pend.height == 15
    assert pend["duration_ns"].null_count() == 15 and set(pend["end_source"]) == {"none"}
    assert pend["seq"].n_unique() == 1 and pend["pg"][0] == "0"
    seq = pend["seq"][0]
    hung = df.filter((pl.col("rank") == 9) & (pl.col("pg") == "0"))
    assert hung["seq"].max() == seq - 1
    # nothing after the pending all-reduce on any rank
    assert df.filter(pl.col("pg") == "0")["seq"].max() == seq
    assert df.height == 16 * (6 * job.slots_per_step + 1) + 15


def test_logs_read_back_through_open_job(tmp_path):
    job = SyntheticJob(ranks=16, steps=9, tp_size=4, hang=2, hang_step=7, job_id="synth")
    df = job_frame(job)
    path = write_logs(job, tmp_path, segment_rows=10, chunk_ranks=5)
    assert path == tmp_path / "synth"
    logs = open_job(tmp_path)
    assert logs.job_id == "synth" and sorted(logs.ranks) == list(range(16))
    back = logs.events(include_pending=True)
    assert not logs.problems
    assert back.height == df.height
    assert back.equals(df.sort("rank", "idx"))
    assert logs.events(include_pending=False).height == df.height - 15
    d = logs.ranks[0]
    assert (d / PENDING_FILE).exists() and not (logs.ranks[2] / PENDING_FILE).exists()
    assert len(list(d.glob("seg-*.parquet"))) == -(-(7 * job.slots_per_step + 1) // 10)
    meta = json.loads((d / META_FILE).read_text())
    assert meta["rank"] == 0 and meta["world_size"] == 16 and meta["counters"]["pending"] == 1
    # every agent's heartbeat: a minute after the newest row
    seen = logs.last_write_ns()
    newest = int(df.select(pl.max_horizontal("t_start_ns", "t_end_ns").max()).item())
    assert set(seen.values()) == {newest + 60 * 10**9}


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        SyntheticJob(ranks=10, tp_size=4)
    with pytest.raises(ValueError):
        SyntheticJob(ranks=8, straggler=8)

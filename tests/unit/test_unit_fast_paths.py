"""Fast paths taken at scale give exactly what the plain paths give.

The interval union of the step analyzers (whole-column passes instead of a window per group)
against its window version, and the reader's one read of every file against the per-rank
reads, on inputs where the fast path applies and on inputs where it must step aside.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
from pathlib import Path

import polars as pl
import pytest

from ringwatch._logs import PENDING_FILE, _increasing, open_job
from ringwatch._schema import polars_schema
from ringwatch.analyzers._steps import _merged_ns, _merged_ns_over, _sorted_by

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "synthetic.py"
_spec = importlib.util.spec_from_file_location("ringwatch_bench_synthetic", _PATH)
synthetic = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = synthetic
_spec.loader.exec_module(synthetic)


def intervals(seed: int, *, n: int, reversed_ok: bool = False, null_start: bool = False,
              null_end: bool = False) -> pl.DataFrame:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = rng.randrange(1000)
        e = s + rng.randrange(-5 if reversed_ok else 0, 200)
        rows.append({"rank": rng.randrange(5), "step": rng.randrange(rng.randrange(1, 40) + 1),
                     "s": None if null_start and s % 7 == 0 else s,
                     "e": None if null_end and s % 11 == 0 else e})
    schema = {"rank": pl.Int32, "step": pl.Int64, "s": pl.Int64, "e": pl.Int64}
    return pl.DataFrame(rows, schema=schema).sort("rank", "step", "s")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["plain", "reversed", "null_start", "null_end", "unsorted"])
def test_interval_union_equals_the_window_version(seed, kind):
    df = intervals(seed, n=random.Random(seed).randrange(1, 1500),
                   reversed_ok=kind == "reversed", null_start=kind == "null_start",
                   null_end=kind == "null_end")
    if kind == "unsorted":
        df = df.sample(fraction=1.0, shuffle=True, seed=seed)
    got = _merged_ns(df, "s", "e", ["rank", "step"]).sort("rank", "step")
    want = _merged_ns_over(df, "s", "e", ["rank", "step"]).sort("rank", "step")
    assert got.schema == want.schema
    assert got.equals(want)


def test_interval_union_by_hand():
    # rank 0 step 0: [0,10] [5,20] [30,40] -> 20 + 10; step 1: [0,100] [10,20] -> 100
    df = pl.DataFrame({"rank": [0, 0, 0, 0, 0, 1], "step": [0, 0, 0, 1, 1, 0],
                       "s": [0, 5, 30, 0, 10, 7], "e": [10, 20, 40, 100, 20, 7]})
    got = dict(((r, s), m) for r, s, m in _merged_ns(df, "s", "e", ["rank", "step"]).iter_rows())
    assert got == {(0, 0): 30, (0, 1): 100, (1, 0): 0}


def test_sorted_by():
    df = pl.DataFrame({"a": [0, 0, 1, 1], "b": ["x", "y", "a", "a"]})
    assert _sorted_by(df, ["a", "b"])
    assert not _sorted_by(df.reverse(), ["a", "b"])
    assert not _sorted_by(pl.DataFrame({"a": [0, None]}), ["a"])
    assert _increasing(pl.DataFrame({"r": [0, 0, 1], "i": [1, 2, 0]}), "r", "i")
    assert not _increasing(pl.DataFrame({"r": [0, 0, 1], "i": [1, 1, 0]}), "r", "i")


def per_rank(logs, **kw) -> pl.DataFrame:
    return pl.concat([logs.rank_events(r, **kw) for r in logs.ranks]).sort("rank", "idx")


@pytest.fixture
def hung_job(tmp_path):
    job = synthetic.SyntheticJob(ranks=12, steps=6, tp_size=4, hang=7, hang_step=5,
                                 job_id="j")
    synthetic.write_logs(job, tmp_path, segment_rows=8)
    return tmp_path / "j"


def test_one_read_of_every_file_equals_the_per_rank_reads(hung_job):
    logs = open_job(hung_job)
    for pending in (True, False):
        assert logs._read_all(pending, None) is not None  # the fast path applies here
        fast = logs.events(include_pending=pending)
        assert fast.schema == pl.Schema(polars_schema())
        assert fast.equals(per_rank(logs, include_pending=pending))
    assert fast.height == 12 * 26 and logs.events().height == 12 * 26 + 11


def test_a_projection_reads_those_columns_in_schema_order(hung_job):
    logs = open_job(hung_job)
    part = logs.events(columns=["step", "host", "status"])
    assert part.columns == ["rank", "host", "idx", "status", "step"]
    assert part.equals(logs.events().select(part.columns))
    assert logs.rank_events(3, columns=["seq"]).columns == ["rank", "idx", "seq"]
    with pytest.raises(ValueError, match="nope"):
        logs.events(columns=["nope"])


def test_the_fast_read_steps_aside_and_the_result_stays_the_same(hung_job):
    d = open_job(hung_job).ranks[2]
    # a pending row that a segment holds too (flushed between the two files' writes)
    seg = sorted(d.glob("seg-*.parquet"))[-1]
    pend = pl.read_parquet(d / PENDING_FILE)
    both = pl.concat([pl.read_parquet(seg), pend])
    from ringwatch.agent.capture._writer import _write_atomic

    _write_atomic(both.sort("idx"), seg)
    logs = open_job(hung_job)
    assert logs._read_all(True, None) is None
    ev = logs.events()
    assert ev.equals(per_rank(logs))
    assert ev.filter(pl.col("rank") == 2)["idx"].is_unique().all()
    # a rank's file copied into another rank's folder
    shutil.copy(seg, open_job(hung_job).ranks[5] / "seg-00000900-00000931.parquet")
    logs = open_job(hung_job)
    assert logs._read_all(True, None) is None
    assert logs.events().equals(per_rank(logs))
    # a file of a newer schema major version
    pl.DataFrame({"rank": [4]}).write_parquet(
        logs.ranks[4] / "seg-00000999.parquet", metadata={"ringwatch_schema_version": "9.0"})
    logs = open_job(hung_job)
    assert logs._read_all(True, None) is None
    assert logs.events().equals(per_rank(logs)) and logs.problems


def frontier_in_one_pass(events: pl.DataFrame) -> pl.DataFrame:
    """compute_frontier as one aggregation (the plain version of its split one)."""
    df = events.filter(~pl.col("is_p2p") & pl.col("seq").is_not_null())
    pending = pl.col("status") == "pending"
    first_pending = pl.col("seq").filter(pending).min()
    at_first = pending & (pl.col("seq") == first_pending)
    return (df.group_by("pg", "rank").agg(
        pl.col("pg_ranks").first(), pl.col("host").first(),
        pl.col("seq").max().alias("entered_seq"),
        pl.col("seq").filter(~pending).max().alias("finished_seq"),
        first_pending.alias("pending_seq"),
        pl.col("op").filter(at_first).first().alias("pending_op"),
        pl.col("t_start_ns").filter(at_first).min().alias("pending_start_ns"),
        pl.col("step").filter(at_first).first().alias("pending_step"))
        .sort("pg", "rank"))


@pytest.mark.parametrize("seed", range(6))
def test_frontier_equals_the_one_pass_version(seed):
    from ringwatch.analyzers import compute_frontier

    job = synthetic.SyntheticJob(ranks=16, steps=8, tp_size=4, seed=seed,
                                 hang=seed + 1 if seed % 2 else None, hang_step=6)
    ev = synthetic.job_frame(job)
    rng = random.Random(seed)
    # stray pending rows, a null status and ops that differ at one number
    flip = [rng.random() < 0.05 for _ in range(ev.height)]
    ev = ev.with_columns(
        pl.when(pl.Series(flip)).then(pl.lit("pending")).otherwise(pl.col("status"))
        .alias("status"),
        pl.when(pl.col("idx") == 3).then(pl.lit("broadcast")).otherwise(pl.col("op"))
        .alias("op"))
    ev = ev.with_columns(pl.when(pl.col("idx") == 5).then(None).otherwise(pl.col("status"))
                         .alias("status"))
    got, want = compute_frontier(ev), frontier_in_one_pass(ev)
    assert got.schema == want.schema
    assert got.equals(want)
    assert want["pending_seq"].null_count() < want.height  # the pending part is exercised


def test_complete_collectives_equals_the_two_filter_version():
    from ringwatch.analyzers._steps import _complete_collectives

    job = synthetic.SyntheticJob(ranks=8, steps=4, tp_size=4, seed=1)
    ev = synthetic.job_frame(job)
    rng = random.Random(4)
    # point-to-point rows that share (pg, seq) with collectives, null seqs, a missing member
    p2p = ev.sample(n=40, seed=2).with_columns(pl.lit(True).alias("is_p2p"),
                                              pl.lit("send").alias("op"))
    nulls = ev.sample(n=10, seed=3).with_columns(pl.lit(None, pl.Int64).alias("seq"))
    ev = pl.concat([ev.filter(pl.Series([rng.random() > 0.02 for _ in range(ev.height)])),
                    p2p, nulls])
    cols = (pl.col("duration_ns").min().alias("_min"),
            pl.col("host").unique().sort().str.join(",").alias("_hosts"))
    key = ["pg", "seq"]
    want = (ev.filter(~pl.col("is_p2p") & pl.col("seq").is_not_null())
            .with_columns(pl.len().over(key).alias("_n"), *(c.over(key) for c in cols))
            .filter(pl.col("_n") == pl.col("pg_size")))
    got = _complete_collectives(ev, *cols)
    assert got.equals(want)
    assert 0 < got.height < ev.height - 50


@pytest.mark.parametrize("rows", [1, 700, 2500])
def test_slices_of_steps_and_ranks_equal_the_whole(monkeypatch, rows):
    """The straggler and link passes over slices of steps (and of ranks) give what one pass
    over every row gives: collectives whose members recorded different steps, incomplete
    ones and point-to-point rows included."""
    from ringwatch.analyzers import _clocks, _hangs, _lateness, _links, _steps, _stragglers
    from ringwatch.analyzers._clocks import compute_host_pairs
    from ringwatch.analyzers._hangs import compute_frontier
    from ringwatch.analyzers._links import compute_group_bandwidth, detect_slow_links
    from ringwatch.analyzers._stragglers import compute_step_lateness, detect_stragglers

    job = synthetic.SyntheticJob(ranks=16, steps=40, tp_size=4, seed=2, straggler=3,
                                 straggler_step=20)
    ev = synthetic.job_frame(job)
    rng = random.Random(rows)
    p2p = ev.sample(n=30, seed=5).with_columns(pl.lit(True).alias("is_p2p"))
    ev = pl.concat([ev.filter(pl.Series([rng.random() > 0.01 for _ in range(ev.height)])),
                    p2p]).sort("rank", "idx")
    # a member that marked one collective with the next step
    ev = ev.with_columns(pl.when((pl.col("rank") == 5) & (pl.col("seq") == 7))
                         .then(pl.col("step") + 1).otherwise(pl.col("step")).alias("step"))
    ev = ev.with_columns(pl.col("host", "pg", "pg_ranks", "op", "status").cast(pl.Categorical))

    def run():
        return (compute_step_lateness(ev), compute_group_bandwidth(ev), detect_stragglers(ev),
                detect_slow_links(ev), compute_host_pairs(ev), compute_frontier(ev))

    want = run()
    # _steps': the per-collective table by slices of groups
    for module in (_stragglers, _lateness, _links, _clocks, _hangs, _steps):
        monkeypatch.setattr(module, "SLICE_ROWS", rows)
    got = run()
    assert got[4].schema == want[4].schema and got[4].equals(want[4])
    assert want[4].height  # the hosts' pairs are exercised
    assert got[5].schema == want[5].schema and got[5].equals(want[5])
    assert got[0].schema == want[0].schema and got[0].equals(want[0])
    assert got[1].schema == want[1].schema and got[1].equals(want[1])
    assert got[2] == want[2] and got[3] == want[3]
    assert want[2]  # the straggler is found


@pytest.mark.parametrize("seq_shift", [0, 1 << 40, -(1 << 20)])
def test_a_slices_join_on_one_key_equals_the_join_on_three(monkeypatch, seq_shift):
    """A slice joins each collective's figures on one integer (the group's dictionary code
    and its number) where that names collectives exactly, on (pg, seq, is_p2p) otherwise
    (numbers out of its bits, groups as strings): the same rows either way."""
    from ringwatch.analyzers import _steps
    from ringwatch.analyzers._steps import _collective_stats, _complete_in_slice

    job = synthetic.SyntheticJob(ranks=16, steps=12, tp_size=4, seed=4)
    ev = synthetic.job_frame(job)
    p2p = ev.sample(n=30, seed=5).with_columns(pl.lit(True).alias("is_p2p"))
    nulls = ev.sample(n=10, seed=3).with_columns(pl.lit(None, pl.Int64).alias("seq"))
    ev = pl.concat([ev, p2p, nulls]).with_columns(pl.col("seq") + seq_shift)
    keep = pl.col("status") == "ok"
    shortest = pl.col("duration_ns").min().alias("_min")
    for strings in (False, True):
        frame = ev if strings else ev.with_columns(pl.col("pg").cast(pl.Categorical))
        stats = _collective_stats(frame, keep, shortest)
        part = frame.filter(keep & pl.col("step").is_between(3, 7))
        assert _steps._one_key(part, stats) == (not strings and seq_shift == 0)
        got = _complete_in_slice(part, stats)
        monkeypatch.setattr(_steps, "_one_key", lambda *_: False)
        want = _complete_in_slice(part, stats)
        monkeypatch.undo()
        assert got.schema == want.schema and got.equals(want)
        assert 0 < got.height < part.height


@pytest.mark.parametrize("files", [1, 2, 7])
@pytest.mark.parametrize("groups", [1, 3, 40])
def test_reads_of_a_few_files_each_equal_one_read(monkeypatch, hung_job, files, groups):
    """The fast path in several reads (of files, of columns) gives the rows of one read, and
    steps aside as one read does: a row repeated across two reads is caught at their
    boundary."""
    from ringwatch import _logs

    monkeypatch.setattr(_logs, "COLUMN_GROUPS", 1)
    logs = open_job(hung_job)
    want = logs.events(categorical=True)
    monkeypatch.setattr(_logs, "FILES_PER_READ", files)
    monkeypatch.setattr(_logs, "COLUMN_GROUPS", groups)
    logs = open_job(hung_job)
    assert logs._read_all(True, None) is not None
    got = logs.events(categorical=True)
    assert got.schema == want.schema and got.equals(want)
    assert got.n_chunks("all") == [1] * got.width
    assert got.equals(per_rank(logs).with_columns(
        pl.col("host", "pg", "pg_ranks", "op", "status", "dtype").cast(pl.Categorical)))
    # the last segment of rank 2 repeated as a pending file: the two fall in different reads
    d = logs.ranks[2]
    seg = sorted(d.glob("seg-*.parquet"))[-1]
    shutil.copy(seg, d / PENDING_FILE)
    logs = open_job(hung_job)
    assert logs._read_all(True, None) is None
    assert logs.events().equals(per_rank(logs))


@pytest.mark.parametrize("categorical", [False, True])
def test_the_per_collective_table_by_slices_of_groups_is_the_whole(monkeypatch, categorical):
    # rows without a group (null pg) too: no slice of groups holds them, they are their own
    from ringwatch.analyzers import _steps
    from ringwatch.analyzers._steps import _collective_stats

    job = synthetic.SyntheticJob(ranks=16, steps=6, tp_size=4, seed=7)
    ev = synthetic.job_frame(job)
    ev = pl.concat([ev, ev.sample(n=20, seed=1).with_columns(pl.lit(None, pl.Utf8).alias("pg"))])
    if categorical:
        ev = ev.with_columns(pl.col("pg").cast(pl.Categorical))
    keep = pl.col("status") == "ok"
    shortest = pl.col("duration_ns").min().alias("_min")

    def table():
        return (_collective_stats(ev, keep, shortest)
                .with_columns(pl.col("pg").cast(pl.Utf8)).sort("pg", "seq", nulls_last=True))

    want = table()
    monkeypatch.setattr(_steps, "SLICE_ROWS", 50)
    got = table()
    assert want["pg"].null_count() and got.equals(want)

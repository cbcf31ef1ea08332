"""The step table ``ringwatch analyze`` sums from a log is the one the agent sums for the
service: the same bytes and busy time per rank, group and step, on real runs' rows, as
measured and as a GPU job reports them (device durations, watchdog ends)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ringwatch.agent.sidecar._rank_tail import _COLUMNS, RankSummary, _consume
from ringwatch.analyzers import detect_slow_links
from ringwatch.analyzers._step_table import is_step_table, step_rows
from ringwatch.analyzers._timing import with_analysis_durations

from fakes import gpu_shaped

DATA = Path(__file__).resolve().parents[1] / "data"
RUNS = ["loaded/healthy-4-ranks", "early/link-at-10", "pipeline/link-p2p"]


def _agent_totals(ev: pl.DataFrame) -> dict:
    """(rank, pg, step) -> (count, bytes, busy ns), as the agent's rank tails sum them."""
    rows = ev.with_columns(pl.lit(None, pl.Int64).alias("t_issue_ns")).select(
        "rank", *[c for c in _COLUMNS])
    out = {}
    for (rank,), part in rows.partition_by("rank", as_dict=True).items():
        s = RankSummary(job="j", rank=rank)
        _consume(s, part.drop("rank"))
        out |= {(rank, pg, step): (t.count, t.nbytes, t.busy_ns)
                for step, groups in s.steps.items() for pg, t in groups.items()}
    return out


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("shape", ["exact", "gpu"])
def test_analyze_sums_the_steps_as_the_agent_does(name, shape):
    ev = pl.read_parquet(DATA / f"{name}.parquet")
    if shape == "gpu":
        ev = gpu_shaped(ev, first_lead_ms=1)
    agent = _agent_totals(ev)
    table = step_rows(with_analysis_durations(ev))
    assert is_step_table(table) and not is_step_table(ev)
    ours = {(r, pg, s): (b, d) for r, pg, s, b, d in
            table.select("rank", "pg", "step", "nbytes", "duration_ns").iter_rows()}
    assert len(agent) > 100 and set(agent) == set(ours)
    for key, (_, nbytes, busy) in agent.items():
        assert ours[key] == (nbytes, busy), key


def test_the_link_pass_reads_a_log_and_its_step_table_alike():
    """``detect_slow_links`` sums a log's rows into the step table itself; handed the table
    (the service's rows), it finds the same."""
    ev = with_analysis_durations(pl.read_parquet(DATA / "early" / "link-at-10.parquet"))
    (f,) = detect_slow_links(ev)
    (g,) = detect_slow_links(step_rows(ev))
    assert f.hosts == g.hosts == ("host1",) and abs(f.since_step - 10) <= 1
    assert (f.ranks, f.since_step, f.evidence) == (g.ranks, g.since_step, g.evidence)


def test_rows_without_a_step_or_finished_collective_make_no_table():
    ev = with_analysis_durations(pl.read_parquet(DATA / "early" / "link-at-10.parquet"))
    assert step_rows(ev.with_columns(pl.lit(None, pl.Int64).alias("step"))).is_empty()
    assert step_rows(ev.head(0)).is_empty()


def _categorical(ev: pl.DataFrame) -> pl.DataFrame:
    """``ev`` as ``ringwatch analyze`` reads a log: strings as categoricals, by rank, idx."""
    return ev.with_columns(pl.col("host", "pg", "pg_ranks", "op", "status")
                           .cast(pl.Categorical)).sort("rank", "idx")


def _strings(table: pl.DataFrame) -> pl.DataFrame:
    return table.with_columns(pl.col("host", "pg", "pg_ranks", "op", "status")
                              .cast(pl.Utf8)).sort("rank", "pg", "step")


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("shape", ["exact", "gpu"])
def test_the_sorted_pass_sums_as_the_grouped_one(name, shape, monkeypatch):
    """A log read as ``analyze`` reads it (groups dictionary-encoded) is summed by whole-column
    passes over its rows sorted by one key, by ranges of ranks; a frame of strings by a
    group-by: the same table, rows out of their start order included."""
    from ringwatch.analyzers import _step_table

    ev = pl.read_parquet(DATA / f"{name}.parquet")
    if shape == "gpu":
        ev = gpu_shaped(ev, first_lead_ms=1)
    ev = with_analysis_durations(ev)
    want = _strings(step_rows(ev))
    # each rank's rows in reverse: the one-key sort must not keep that order
    backwards = _categorical(ev).sort("rank", "idx", descending=[False, True])
    for rows in (1_000_000, 200):
        monkeypatch.setattr(_step_table, "SLICE_ROWS", rows)
        for frame in (_categorical(ev), backwards):
            got = _strings(step_rows(frame))
            assert got.equals(want.select(got.columns)), (rows, frame is backwards)


@pytest.mark.parametrize("name", RUNS)
def test_the_link_pass_sums_a_log_range_by_range_as_its_whole_table(name, monkeypatch):
    """``compute_group_bandwidth(summed=True)`` sums each range of ranks' rows and combines
    the collectives' figures across ranges: the same bandwidth as read from the whole table,
    and as from the rows in one range."""
    from ringwatch.analyzers import _links, _step_table, compute_group_bandwidth

    ev = _categorical(with_analysis_durations(pl.read_parquet(DATA / f"{name}.parquet")))
    want = compute_group_bandwidth(step_rows(ev))
    assert want.height > 10
    for rows in (1_000_000, 300):
        monkeypatch.setattr(_links, "SLICE_ROWS", rows)
        monkeypatch.setattr(_step_table, "SLICE_ROWS", rows)
        assert compute_group_bandwidth(ev, summed=True).equals(want), rows

"""The per-rank running figures of the straggler scores (whole-column passes over a frame
sorted by rank then step) equal the window expressions they replace, and the per-frame memo
gives what a fresh computation gives, for as long as the frame lives."""

from __future__ import annotations

import gc
import random

import polars as pl
import pytest

from ringwatch.analyzers._hangs import typical_step_s
from ringwatch.analyzers._memo import per_frame
from ringwatch.analyzers._sorted import rank_starts, recent_count, run_first, streak


def frame(seed: int, *, ranks: int, null_rank: bool = False) -> pl.DataFrame:
    """Ranks with 1-30 steps each (numbered with gaps), flags in runs of any length, and a
    signed value whose sign makes runs, sorted by rank then step."""
    rng = random.Random(seed)
    rows = []
    for r in range(ranks):
        step = rng.randrange(0, 50_000)
        p = rng.random()
        for _ in range(rng.randrange(1, 31)):
            step += rng.randrange(1, 4)
            rows.append({"rank": None if null_rank and r == 0 else r, "step": step,
                         "flag": rng.random() < p,
                         "x": rng.choice([-1.0, 0.0, 0.5, 2.0]) if rng.random() < 0.7 else 1.0})
    df = pl.DataFrame(rows, schema={"rank": pl.Int64, "step": pl.Int64, "flag": pl.Boolean,
                                    "x": pl.Float64})
    return df.sort("rank", "step", nulls_last=False)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rows", [1, 2, 4, 7])
def test_recent_count_is_the_rolling_sum_over_the_rank(seed, rows):
    df = frame(seed, ranks=40, null_rank=seed == 5)
    got = df.select(recent_count(pl.col("flag"), rows).alias("v"))["v"]
    want = df.select(pl.col("flag").cast(pl.Int32).rolling_sum(rows, min_samples=1)
                     .over("rank").alias("v"))["v"]
    assert got.to_list() == want.to_list()
    assert got.dtype == want.dtype


@pytest.mark.parametrize("seed", range(8))
def test_streak_is_the_cumulative_sum_within_runs_of_the_flag(seed):
    df = frame(seed, ranks=40, null_rank=seed == 7)
    got = df.select(streak(pl.col("flag")).alias("v"))["v"]
    seg = (~pl.col("flag")).cast(pl.Int32).cum_sum().over("rank")
    want = (df.with_columns(seg.alias("_seg"))
            .select(pl.col("flag").cast(pl.Int32).cum_sum().over("rank", "_seg").alias("v")))["v"]
    assert got.to_list() == want.to_list()
    assert got.dtype == want.dtype


@pytest.mark.parametrize("seed", range(8))
def test_run_first_is_the_first_step_of_each_run(seed):
    df = frame(seed, ranks=40, null_rank=seed == 7)
    on = pl.col("x") > 0
    got = df.select(run_first("step", on).alias("v"))["v"]
    run = (~on).cast(pl.Int32).cum_sum().over("rank")
    want = (df.with_columns(run.alias("_run"))
            .select(pl.col("step").filter(on).min().over("rank", "_run").alias("v")))["v"]
    assert got.to_list() == want.to_list()
    assert got.null_count() > 0 and got.drop_nulls().n_unique() > 10  # both kinds present


def test_rank_starts_marks_each_ranks_first_row():
    df = pl.DataFrame({"rank": [None, None, 0, 0, 3, 3, 3, 4]})
    assert df.select(rank_starts())["rank"].to_list() == [
        True, False, True, False, True, False, False, True]


def test_per_frame_keeps_a_result_while_its_frame_lives():
    calls = []

    @per_frame
    def height(df: pl.DataFrame) -> int:
        calls.append(1)
        return df.height

    a = pl.DataFrame({"x": [1, 2, 3]})
    assert height(a) == 3 and height(a) == 3 and len(calls) == 1
    b = a.filter(pl.col("x") > 1)  # another frame: computed afresh
    assert height(b) == 2 and len(calls) == 2
    del a, b
    gc.collect()
    assert height.held == {}  # nothing kept past its frame


def test_typical_step_is_the_same_from_the_memo_and_afresh():
    rows = [{"rank": r, "step": s, "mono_start_ns": 10**9 * s + 10**6 * r}
            for r in range(4) for s in range(6)]
    df = pl.DataFrame(rows)
    first = typical_step_s(df)
    assert typical_step_s(df) == first == typical_step_s(df.clone()) == pytest.approx(1.0)


@pytest.mark.parametrize("first,last", [(0, 9), (2, 5), (7, 20), (4, 4)])
def test_step_time_between_steps_is_that_of_their_rows_alone(first, last):
    from ringwatch.analyzers._hangs import step_s_between

    rng = random.Random(first * 100 + last)
    rows, t = [], {r: 0 for r in range(5)}
    for s in range(10):
        for r in range(5):
            t[r] += rng.randrange(10**8, 3 * 10**8)
            rows += [{"rank": r, "step": s, "mono_start_ns": t[r] + k * 10**6}
                     for k in range(rng.randrange(1, 4))]
    df = pl.DataFrame(rows)
    alone = df.filter(pl.col("step").is_between(first, last))
    assert step_s_between(df, first, last) == typical_step_s(alone)


@pytest.mark.parametrize("rows", [1, 3, 10, 1000])
def test_first_starts_by_ranges_of_ranks_equal_one_pass(monkeypatch, rows):
    """Per (rank, step) first starts over row ranges of whole ranks (a frame sorted by rank)
    equal one pass; a frame not sorted by rank, or with a null rank, takes one pass."""
    from ringwatch.analyzers import _steps
    from ringwatch.analyzers._steps import rank_row_ranges, step_firsts

    rng = random.Random(rows)
    df = pl.DataFrame([{"rank": r, "step": rng.randrange(6) if rng.random() < 0.9 else None,
                        "mono_start_ns": rng.randrange(10**9)}
                       for r in range(7) for _ in range(rng.randrange(1, 9))])
    want = step_firsts(df)
    monkeypatch.setattr(_steps, "SLICE_ROWS", rows)
    ranges = rank_row_ranges(df, rows)
    if rows < df.height:
        assert ranges and sum(n for _, n in ranges) == df.height
        for at, n in ranges:  # whole ranks
            inside = set(df.slice(at, n)["rank"])
            assert not inside & set(df.slice(0, at)["rank"])
    assert step_firsts(df.clone()).equals(want)
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=1)
    assert rank_row_ranges(shuffled, rows) is None
    assert step_firsts(shuffled).equals(want)

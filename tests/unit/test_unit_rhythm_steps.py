"""The agent numbers a serving job's iterations live as ``ringwatch analyze`` does post-mortem,
and the analyzers name the stored serving runs' culprits (``tests/data/serving/``: real 4-rank
Gloo runs, no optimizer and no step marks)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ringwatch._analyze import analyze_events
from ringwatch.agent.sidecar._rhythm_steps import LEARN_ROWS, RhythmSteps
from ringwatch.analyzers._policy import split_hiccups
from ringwatch.analyzers._rhythm import assign_rhythm_steps

DATA = Path(__file__).resolve().parents[1] / "data"
RUNS = {"decode": DATA / "serving" / "decode-tp2-straggler.parquet",
        "moe": DATA / "serving" / "moe-hot-expert.parquet"}


def _agent_rows(ev: pl.DataFrame, rank: int) -> list[dict]:
    """One rank's rows as the agent reads them from its segments (completion order)."""
    return (ev.filter(pl.col("rank") == rank)
            .select("idx", "pg", "op", "nbytes", "peer", "is_p2p", "status", "step",
                    "t_start_ns", "t_end_ns").sort("t_end_ns").to_dicts())


@pytest.mark.parametrize("name", sorted(RUNS))
@pytest.mark.parametrize("chunk", [1, 7, 100, 5000])
def test_live_iterations_are_the_post_mortem_ones(name, chunk):
    ev = pl.read_parquet(RUNS[name])
    assert ev["step"].unique().to_list() == [0]  # the job marks nothing
    post = assign_rhythm_steps(ev)
    for rank in range(4):
        want = dict(post.filter(pl.col("rank") == rank).select("idx", "step").iter_rows())
        rows, rs, got = _agent_rows(ev, rank), RhythmSteps(), {}
        for i in range(0, len(rows), chunk):
            for r in rs.feed(rows[i:i + chunk]):
                assert r["idx"] not in got  # each row numbered once
                got[r["idx"]] = r["step"]
        assert rs.active and not rs.marked
        # every row numbered live has the post-mortem's step; only the newest iteration,
        # whose period is not complete, and nothing else, waits
        assert {i: want[i] for i in got} == got
        missing = {i for i, s in want.items() if s is not None} - set(got)
        assert len(missing) < len(rs.template), (rank, len(missing))
        assert len(got) > 0.95 * len(rows)


def test_a_job_that_marks_its_steps_passes_through():
    ev = pl.read_parquet(DATA / "long" / "straggler-work-400.parquet")
    rows = (ev.filter(pl.col("rank") == 0).sort("idx")
            .select("idx", "pg", "op", "nbytes", "peer", "step", "t_start_ns", "t_end_ns")
            .to_dicts())
    rs = RhythmSteps()
    assert [r["step"] for r in rows[:4]] == [None, None, None, 0]
    first = rs.feed(rows[:4])  # one step number so far: held, it may be a serving job
    rest = rs.feed(rows[4:LEARN_ROWS])
    assert rs.marked and not rs.active
    assert first == [] and [r["idx"] for r in rest] == [r["idx"] for r in rows[:LEARN_ROWS]]
    assert [r["step"] for r in rest] == [r["step"] for r in rows[:LEARN_ROWS]]
    assert rs.feed(rows[LEARN_ROWS:LEARN_ROWS + 3]) == rows[LEARN_ROWS:LEARN_ROWS + 3]


def test_a_job_without_a_rhythm_keeps_bounded_memory():
    rs = RhythmSteps()
    import random

    rng = random.Random(3)
    for i in range(20 * LEARN_ROWS):
        out = rs.feed([{"idx": i, "pg": str(rng.randrange(50)), "op": "all_reduce",
                        "nbytes": rng.randrange(1, 10**6), "peer": None, "step": 0,
                        "t_start_ns": i * 1000, "t_end_ns": i * 1000 + 10}])
        assert out == []
    assert not rs.active and len(rs.learning) <= 8 * LEARN_ROWS


def _found(name: str):
    ev = pl.read_parquet(RUNS[name])
    found, _ = split_hiccups(analyze_events(ev, now_ns=int(ev["t_end_ns"].max())))
    return found


def test_the_stored_decode_straggler_is_named_from_its_onset():
    (f,) = _found("decode")
    assert (f.kind, f.cls, f.ranks) == ("straggler", "compute straggler", (1,))
    assert abs(f.since_step - 33) <= 3  # first slowed step 33, in the rhythm's iterations


def test_the_stored_hot_expert_is_named():
    (f,) = _found("moe")
    assert (f.kind, f.cls, f.ranks) == ("imbalance", "hot expert", (1,))


def test_the_report_says_where_the_steps_came_from(capsys):
    from ringwatch._cli import main

    assert main(["analyze", str(RUNS["decode"])]) == 0
    out = capsys.readouterr().out
    assert "steps: the job marks none" in out and "STRAGGLER" in out
    assert main(["analyze", str(DATA / "long" / "straggler-work-400.parquet")]) == 0
    assert "steps: the job marks none" not in capsys.readouterr().out

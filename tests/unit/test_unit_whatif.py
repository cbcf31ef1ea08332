"""The what-if of a data-parallel straggler, by replay, on a real run: the job's step with
the straggler working like its peers, against the same run's steps before the fault."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from ringwatch.analyzers import detect_stragglers
from ringwatch.analyzers._hangs import typical_step_s

RUN = Path(__file__).resolve().parents[1] / "data" / "long" / "straggler-work-400.parquet"


def test_a_data_parallel_straggler_is_replayed_to_the_step_it_had_before():
    ev = pl.read_parquet(RUN)  # real: 4 Gloo DDP ranks, rank 2 twice the work from step 40
    (f,) = [f for f in detect_stragglers(ev) if f.kind == "straggler"]
    assert f.ranks == (2,)
    line = next(e for e in f.evidence if "with this rank working like its peers" in e)
    assert "replay of the steps' dependencies" in line  # not the fallback
    now, fixed = (float(x) for x in re.search(r"took (\d+) ms; ~(\d+) ms", line).groups())
    before = 1e3 * typical_step_s(ev.filter(pl.col("step").is_between(5, 39)))
    assert now > 1.3 * before  # the fault cost a third of the step
    assert abs(fixed - before) <= 0.10 * before
    # beside it, the step as measured before the onset: what the replay is read against
    since, measured = (int(x) for x in re.search(
        r"; before step (\d+) the step took (\d+) ms$", line).groups())
    assert since == f.since_step and abs(measured - before) <= 0.05 * before, line


def test_without_the_async_flag_the_what_if_falls_back_to_the_step_less_the_delay():
    ev = pl.read_parquet(RUN).drop("async_op")
    (f,) = [f for f in detect_stragglers(ev) if f.kind == "straggler"]
    assert any("if this rank arrived like its peers" in e for e in f.evidence)

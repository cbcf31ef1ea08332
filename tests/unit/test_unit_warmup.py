"""A job's warm-up from its own step times: a job whose first steps compile (each rank at its
own pace, 20-200 ms before each collective of its first six steps, so those steps take 6-12x
the usual one) keeps the verdict of the same job without them, post-mortem and live.

The cases are built from a real run (``tests/data/long/``: 4 Gloo DDP ranks, 400 steps, rank 2
doing twice the work from step 40): in each of its first six steps' collectives one member
arrives late by a drawn delay and the others wait for it in the collective (as a collective
holds its members); everything after is shifted by the delays so far, so the ranks stay
aligned as they are in a real job."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ringwatch._analyze import analyze_events
from ringwatch.analyzers import Thresholds
from ringwatch.analyzers._online import OnlineWindow
from ringwatch.analyzers._policy import split_hiccups, split_undecided
from ringwatch.analyzers._warmup import leading_warmup_steps, step_durations_ms

DATA = Path(__file__).resolve().parents[1] / "data"
RUN = DATA / "long" / "straggler-work-400.parquet"
SLOW_STEPS = 6


def _compiled(ev: pl.DataFrame, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    key = ["pg", "seq"]
    coll = (ev.filter((pl.col("step") < SLOW_STEPS) & ~pl.col("is_p2p")
                      & pl.col("seq").is_not_null())
            .group_by(key).agg(pl.col("t_start_ns").min().alias("_c0"),
                               pl.col("rank").unique().sort().alias("_m"))
            .sort("_c0"))
    delay = [int(rng.uniform(0.02, 0.2) * 1e9) for _ in range(coll.height)]
    late = [rng.choice(m) for m in coll["_m"].to_list()]
    c0 = np.array(coll["_c0"].to_list(), dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(delay)])
    coll = coll.select(*key, pl.Series("_d", delay, dtype=pl.Int64),
                       pl.Series("_late", late, dtype=pl.Int32),
                       pl.Series("_cum", cum[:-1], dtype=pl.Int64))
    before = np.searchsorted(c0, ev["t_start_ns"].fill_null(0).to_numpy(), side="left")
    ev = ev.with_columns(pl.Series("_sh", cum[before], dtype=pl.Int64)).join(
        coll, on=key, how="left")
    own = pl.col("_d").is_not_null()
    start = pl.when(own).then(pl.col("_cum") + pl.when(pl.col("rank") == pl.col("_late"))
                              .then(pl.col("_d")).otherwise(0)).otherwise(pl.col("_sh"))
    end = pl.when(own).then(pl.col("_cum") + pl.col("_d")).otherwise(pl.col("_sh"))
    ev = ev.with_columns(*(pl.col(c) + start for c in ("t_start_ns", "mono_start_ns")),
                         *(pl.col(c) + end for c in ("t_end_ns", "mono_end_ns")))
    return (ev.with_columns((pl.col("t_end_ns") - pl.col("t_start_ns")).alias("duration_ns"))
            .drop("_sh", "_d", "_late", "_cum").sort("rank", "idx"))


def _key(f):
    return (f.kind, f.cls, f.ranks, f.since_step, f.detected_step)


def _verdict(ev: pl.DataFrame, th: Thresholds | None = None, info: dict | None = None):
    found, _ = split_hiccups(analyze_events(ev, now_ns=int(ev["t_end_ns"].max()),
                                            thresholds=th, info=info))
    return [_key(f) for f in found]


@pytest.fixture(scope="module")
def run():
    ev = pl.read_parquet(RUN)
    return ev, _verdict(ev)


@pytest.mark.parametrize("seed", range(4))
def test_a_compiling_start_keeps_the_verdict(run, seed):
    ev, truth = run
    assert truth == [("straggler", "compute straggler", (2,), 41, 43)]
    case = _compiled(ev, seed)
    slow = step_durations_ms(case)[:SLOW_STEPS + 2]
    usual = float(np.median(step_durations_ms(case)))
    assert max(slow[1:SLOW_STEPS]) > 5 * usual and slow[SLOW_STEPS] < 1.5 * usual, slow
    info: dict = {}
    assert _verdict(case, info=info) == truth
    assert info["warmup_steps"] == SLOW_STEPS
    # with the warm-up rule off, the slow start is read as baseline
    info = {}
    _verdict(case, Thresholds(warmup_slow_ratio=1e9), info)
    assert info["warmup_steps"] == 2


def test_live_finds_the_same_warm_up_and_verdict(run):
    ev, truth = run
    case = _compiled(ev, 0)
    now = int(case["t_end_ns"].max())
    w = OnlineWindow()
    for lo in range(0, 400, 7):
        w.add(case.filter(pl.col("step").is_between(lo, lo + 6)))
        got = w.findings(now_ns=now)
    assert w.warmup_found == SLOW_STEPS
    got, _ = split_undecided(split_hiccups(tuple(
        f for f in got if f.kind in ("straggler", "imbalance")))[0], newest_step=399)
    assert [_key(f) for f in got] == truth
    restored = OnlineWindow()
    restored.restore(json.loads(json.dumps(w.state())))
    assert restored.warmup_found == SLOW_STEPS


@pytest.mark.parametrize("path", [RUN, *sorted((DATA / "pipeline").glob("*.parquet"))])
def test_real_runs_keep_the_fixed_warm_up(path):
    ev = pl.read_parquet(path)
    assert leading_warmup_steps(ev, least=2, baseline_steps=20, slow_ratio=3.0) == 2


def test_a_slow_step_after_usual_ones_is_no_warm_up(run):
    ev, _ = run
    # the tenth step made 10x longer: a hiccup after a usual start
    durations = step_durations_ms(ev)
    assert durations[0] < 3 * float(np.median(durations))
    shift = pl.when(pl.col("step") >= 10).then(int(10 * np.median(durations) * 1e6)).otherwise(0)
    late = ev.with_columns(*(pl.col(c) + shift for c in ("t_start_ns", "mono_start_ns",
                                                         "t_end_ns", "mono_end_ns")))
    assert leading_warmup_steps(late, least=2, baseline_steps=20, slow_ratio=3.0) == 2

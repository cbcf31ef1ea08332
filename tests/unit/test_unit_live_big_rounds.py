"""A round of the service that brings more new steps than its window holds (a catch-up push,
rounds that fell behind on a loaded machine) judges them as smaller pushes would: a real
run's rows through the agent's rank tails, its OTLP pusher and the service, 20 or 100 steps a
round, give the straggler ``ringwatch analyze`` gives, with its onset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl
import pytest

from ringwatch._clock import FakeClock
from ringwatch.agent.sidecar._rank_tail import _COLUMNS, _consume
from ringwatch.analyzers._policy import split_hiccups
from ringwatch.service._analysis import by_steps
from ringwatch.service._service import Service, ServiceConfig

LONG = Path(__file__).resolve().parents[1] / "data" / "long" / "straggler-work-400.parquet"
_spec = importlib.util.spec_from_file_location(
    "ringwatch_bench_live_replay_rounds",
    Path(__file__).resolve().parents[2] / "benchmarks" / "live_replay.py")
_replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_replay)


def _key(f) -> tuple:
    return f.kind, f.cls, f.ranks, f.since_step


def test_by_steps_cuts_a_round_into_parts_of_consecutive_steps():
    items = [((r, "0", s), {}) for s in (5, 6, 7, 9) for r in (0, 1)]
    work = [((0, s), {}) for s in (6, 10)]
    parts = by_steps(items, work, 2)
    assert [sorted({k[2] for k, _ in i} | {k[1] for k, _ in w}) for i, w in parts] == [
        [5, 6], [7, 9], [10]]
    assert sum(len(i) for i, _ in parts) == len(items) and sum(len(w) for _, w in parts) == 2
    assert by_steps(items, work, 5) == [(items, work)]
    assert by_steps([], [], 3) == [([], [])]


@pytest.mark.parametrize("per_round", [20, 100])
def test_a_round_of_more_steps_than_the_window_judges_them_all(per_round):
    from ringwatch._analyze import analyze_events

    ev = pl.read_parquet(LONG).filter(pl.col("step").is_null() | (pl.col("step") < 160))
    want = sorted(_key(f) for f in split_hiccups(analyze_events(
        ev, now_ns=int(ev["t_end_ns"].max())))[0] if f.kind != "hang")
    assert [k[:3] for k in want] == [("straggler", "compute straggler", (2,))], want
    rows = ev.with_columns(pl.lit(None, pl.Int64).alias("t_issue_ns"),
                           pl.lit(None, pl.Int64).alias("device_duration_ns"),
                           pl.lit("wait").alias("end_source")).select(
        "rank", "local_rank", "host", *_COLUMNS)
    clock = FakeClock(wall_ns=int(rows["t_start_ns"].min()))
    svc = Service(ServiceConfig(state_dir=None), clock=clock)
    pusher, ranks = _replay.agent_for(rows, svc, clock)
    shown = {}
    for lo in range(0, 160 + per_round, per_round):
        part = rows.filter(pl.col("step").is_between(lo, lo + per_round - 1))
        for (rank,), r in part.partition_by("rank", as_dict=True).items():
            _consume(ranks[rank], r.drop("rank", "local_rank", "host"))
        if not part.is_empty():
            clock.advance(max(0, int(part["t_end_ns"].max()) - clock.wall_ns()))
        assert pusher.push(clock.wall_ns())
        svc.analyze_once()
        shown |= {t.id: _key(t.finding) for t in svc.store.current("job", state="open")
                  if t.finding.kind != "hang"}
    assert sorted(shown.values()) == want, (shown, want)

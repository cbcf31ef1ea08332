"""Steps are counted in steps seen, not by their numbers: a job resumed from a checkpoint at
step 50,000, or one that numbers its steps 0, 10, 20..., gets the verdict it gets numbered
0, 1, 2... (the same rank and class; the same onset, in its own numbers)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from test_unit_links import LAYERED
from test_unit_links import job as layered_job

from ringwatch._analyze import analyze_events
from ringwatch.analyzers import detect_slow_links
from ringwatch.analyzers._policy import split_hiccups

RUN = Path(__file__).resolve().parents[1] / "data" / "long" / "straggler-work-400.parquet"
NUMBERINGS = {"resumed at 50,000": lambda s: s + 50_000, "every 10th": lambda s: s * 10,
              "every 10th from 7": lambda s: s * 10 + 7}


@pytest.mark.parametrize("name", NUMBERINGS)
def test_a_real_straggler_run_renumbered_gets_the_same_verdict(name):
    ev = pl.read_parquet(RUN)  # real: 4 Gloo ranks, rank 2 twice the work from step 40
    now = int(ev["t_end_ns"].max())
    renumber = NUMBERINGS[name]
    (base,) = split_hiccups(analyze_events(ev, now_ns=now))[0]
    (f,) = split_hiccups(analyze_events(ev.with_columns(renumber(pl.col("step"))),
                                         now_ns=now))[0]
    assert (f.kind, f.cls, f.ranks) == (base.kind, base.cls, base.ranks) == (
        "straggler", "compute straggler", (2,))
    assert (f.since_step, f.detected_step) == (renumber(base.since_step),
                                               renumber(base.detected_step))


@pytest.mark.parametrize("name", NUMBERINGS)
def test_a_slow_link_renumbered_gets_the_same_verdict(name):
    ev = layered_job(LAYERED, slow_hosts=("host1",))
    (base,) = detect_slow_links(ev)
    (f,) = detect_slow_links(ev.with_columns(NUMBERINGS[name](pl.col("step"))))
    assert (f.hosts, f.ranks) == (base.hosts, base.ranks) == (("host1",), (0, 1, 2, 3, 6, 7))
    assert f.since_step == NUMBERINGS[name](base.since_step)

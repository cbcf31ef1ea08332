"""Real runs whose fault begins at step 10, within the baseline steps
(``tests/data/early/README.md``): the fault is named, from its onset."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ringwatch._analyze import analyze_events
from ringwatch.analyzers._policy import split_hiccups

DATA = Path(__file__).resolve().parents[1] / "data" / "early"


def _findings(name: str):
    ev = pl.read_parquet(DATA / f"{name}.parquet")
    return split_hiccups(analyze_events(ev, now_ns=int(ev["t_end_ns"].max())))[0]


def test_a_straggler_from_step_10_is_a_straggler_from_its_onset():
    (f,) = _findings("straggler-at-10")
    assert (f.kind, f.cls, f.ranks) == ("straggler", "compute straggler", (2,))
    assert abs(f.since_step - 11) <= 3 and f.detected_step - 11 <= 3, f


def test_a_link_slowed_from_step_10_is_a_slow_link_on_its_host():
    (f,) = _findings("link-at-10")
    assert (f.kind, f.hosts) == ("slow_link", ("host1",)) and abs(f.since_step - 10) <= 3, f

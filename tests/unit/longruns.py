"""The stored long real runs (``tests/data/long/``, see its README) and what ``ringwatch
analyze`` finds in them."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ringwatch._analyze import analyze_events
from ringwatch.analyzers._policy import split_hiccups

LONG = Path(__file__).resolve().parents[1] / "data" / "long"


def analyzed(name: str, **kwargs) -> tuple[pl.DataFrame, int, tuple]:
    """``(rows, now_ns, findings)`` of one stored run: its rows, the wall clock of its last
    row, and its findings with the hiccups set apart (``kwargs`` to ``analyze_events``)."""
    ev = pl.read_parquet(LONG / name)
    now = int(ev["t_end_ns"].max())
    found, _ = split_hiccups(analyze_events(ev, now_ns=now, **kwargs))
    return ev, now, found

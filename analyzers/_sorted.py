"""Per-rank running figures over a frame sorted by rank then step, as whole-column passes.

The straggler scores are per rank, step after step: counts over the last few steps, streaks,
the first step of a run. Written as window expressions (``.over("rank")``, ``.over("rank",
run)``) each is a group-by over every rank; with thousands of ranks (and a group per run)
they were most of the scores' time. On a frame sorted by rank then step, a rank's rows are
contiguous: the same figures are a cumulative sum (integers: exact) corrected where a rank
starts, or a value carried forward from where a run starts. ``tests/unit/test_unit_sorted.py``
checks each against its window expression.
"""

from __future__ import annotations

import polars as pl

#: Stands for "none" while a value is carried forward (``forward_fill`` fills nulls).
_NONE = -(2**63)


def rank_starts(key: str = "rank") -> pl.Expr:
    """True at each rank's first row (the frame's first row included)."""
    return pl.col(key).ne_missing(pl.col(key).shift(1)) | (pl.int_range(pl.len()) == 0)


def recent_count(flag: pl.Expr, rows: int, key: str = "rank") -> pl.Expr:
    """How many of the rank's last ``rows`` rows (this one included) have ``flag``:
    ``flag.cast(Int32).rolling_sum(rows, min_samples=1).over(key)``. ``flag`` has no nulls."""
    done = flag.cast(pl.Int64).cum_sum()
    before_rank = pl.when(rank_starts(key)).then(done - flag.cast(pl.Int64)).forward_fill()
    return (done - pl.max_horizontal(done.shift(rows).fill_null(0), before_rank)
            ).cast(pl.Int32)


def streak(flag: pl.Expr, key: str = "rank") -> pl.Expr:
    """Rows in a row with ``flag`` up to this one within the rank (0 where it is false):
    the cumulative sum of ``flag`` over each run that starts at a rank's first row or at a
    row without it. ``flag`` has no nulls."""
    done = flag.cast(pl.Int64).cum_sum()
    base = (pl.when(rank_starts(key)).then(done - flag.cast(pl.Int64))
            .when(~flag).then(done).otherwise(None).forward_fill())
    return (done - base).cast(pl.Int32)


def run_first(value: str, on: pl.Expr, key: str = "rank") -> pl.Expr:
    """``value`` (an integer column) at the first row with ``on`` of each run; null for a
    run without one. A run starts at a rank's first row or at a row without ``on``, and holds
    the rows with ``on`` after it: ``pl.col(value).filter(on).min().over(key, run)`` with
    ``run = (~on).cum_sum().over(key)``, where ``value`` grows within a rank. ``on`` has no
    nulls."""
    starts = rank_starts(key) | ~on
    nxt = (~rank_starts(key)).shift(-1).fill_null(False) & on.shift(-1).fill_null(False)
    v = pl.col(value).cast(pl.Int64)
    first = (pl.when(~starts).then(None).when(on).then(v).when(nxt).then(v.shift(-1))
             .otherwise(pl.lit(_NONE, pl.Int64)).forward_fill())
    return pl.when(first == _NONE).then(None).otherwise(first)


__all__ = ["rank_starts", "recent_count", "run_first", "streak"]

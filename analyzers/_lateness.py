"""What the straggler analyzer reads from the rows: per (rank, step) how long the rank waited
in collectives and how long it spent outside them, and per (rank, group) how late it came.

See :mod:`ringwatch.analyzers._stragglers` for what these figures mean and how they are judged.
"""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._islands import rank_islands
from ringwatch.analyzers._steps import (
    COLLECTIVE,
    SLICE_ROWS,
    _collective_stats,
    _complete_collectives,
    _complete_in_slice,
    _merged_ns,
    _slices,
    sorted_by,
)


def compute_step_lateness(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step), clock-free wait and last arrivals.

    Args:
        events: Rows of one job; only finished collectives (``ok``, with a duration) that
            every member of the group recorded, with a step, are used.

    Returns:
        Columns ``rank``, ``host``, ``step``, ``collectives``, ``wait_ns`` (time spent waiting
        for the last member, from durations), ``last_arrivals`` (collectives where this
        rank had the shortest duration) and ``compute_ns`` (the rank's time outside any
        collective before each of the step's: :func:`compute_outside_ns`), sorted by step
        then rank.
    """
    # Only the columns used: every filter and sort of the full-width frame copies all of
    # them (gigabytes at ten million rows). A whole log goes by slices of steps: every
    # figure is per (rank, step), and each collective's shortest duration and member count
    # come from all the rows (_collective_stats).
    cols = ["rank", "host", "step", "pg", "seq", "is_p2p", "pg_size", "status",
            "mono_start_ns", "duration_ns"]
    keep = ((pl.col("status") == "ok") & pl.col("step").is_not_null()
            & pl.col("duration_ns").is_not_null() & pl.col("mono_start_ns").is_not_null())
    shortest = pl.col("duration_ns").min().alias("_min")
    slices = _slices(events, "step", SLICE_ROWS)
    outside = compute_outside_ns(events)
    if slices is None:
        parts = [_lateness_parts(_complete_collectives(
            events.select(cols).filter(keep), shortest), outside)]
    else:
        stats = _collective_stats(events.select(cols), keep, shortest)
        parts = [_lateness_parts(_complete_in_slice(
            events.select(cols).filter(keep & COLLECTIVE & pl.col("step").is_between(lo, hi)),
            stats, (lo, hi)),
            outside.filter(pl.col("step").is_between(lo, hi))) for lo, hi in slices]
    out = pl.concat(parts).select(
        "rank", "host", "step", "collectives", "wait_ns", "last_arrivals", "compute_ns",
    )
    return out.join(rank_islands(events), on="rank", how="left").with_columns(
        pl.col("island").fill_null(-1)).sort("step", "rank")


def _lateness_parts(df: pl.DataFrame, outside: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step) of complete collectives with ``_min``: the counts, ``wait_ns`` and
    ``compute_ns`` (from ``outside``), joined per slice (joins of whole-log tables of
    millions of (rank, step) rows cost more than the slices)."""
    df = df.select("rank", "host", "step", "mono_start_ns", "duration_ns", "_min")
    # the sort copies what it sorts: only the interval columns
    wait = _merged_ns(sorted_by(df.select("rank", "step", "mono_start_ns", (
        pl.col("mono_start_ns") + pl.col("duration_ns") - pl.col("_min")).alias("_wait_end")
    ), "rank", "step", "mono_start_ns"), "mono_start_ns", "_wait_end",
        ["rank", "step"]).rename({"merged_ns": "wait_ns"})
    per = df.group_by("rank", "step").agg(
        pl.col("host").first(), pl.len().alias("collectives"),
        (pl.col("duration_ns") == pl.col("_min")).sum().alias("last_arrivals"))
    return per.join(wait, on=["rank", "step"]).join(outside, on=["rank", "step"], how="left")


def compute_outside_ns(events: pl.DataFrame) -> pl.DataFrame:
    """Per (rank, step), ``compute_ns``: the rank's time outside collectives, on its own
    monotonic clock: before each of the step's collectives, the time since the rank's
    previous collective ended (if it had ended; overlapping ones count once). That is the
    forward pass, the backward work not hidden under transfers, the optimizer and the data
    loading: what a compute straggler spends longer on than its peers. No clock is compared
    across ranks."""
    keep = (pl.col("step").is_not_null() & pl.col("mono_start_ns").is_not_null()
            & pl.col("mono_end_ns").is_not_null())
    # per rank: slices of ranks are exact
    slices = None if events["rank"].null_count() else _slices(events, "rank", SLICE_ROWS)
    if slices is not None:
        return pl.concat([_outside_ns(events.filter(pl.col("rank").is_between(lo, hi)), keep)
                          for lo, hi in slices])
    return _outside_ns(events, keep)


def _outside_ns(events: pl.DataFrame, keep: pl.Expr) -> pl.DataFrame:
    df = sorted_by(events.select("rank", "step", "mono_start_ns", "mono_end_ns").filter(keep),
                   "rank", "mono_start_ns")
    # the latest end among the rank's earlier collectives: the running maximum, one row back
    # (one window and a shift over the sorted frame, not nested windows)
    ended = pl.col("mono_end_ns").cum_max().over("rank")
    before = pl.when(pl.col("rank") == pl.col("rank").shift(1)).then(ended.shift(1))
    return df.with_columns((pl.col("mono_start_ns") - before).clip(lower_bound=0).fill_null(0)
                           .alias("_gap")).group_by("rank", "step").agg(
        pl.col("_gap").sum().alias("compute_ns"))


def compute_group_lateness(events: pl.DataFrame, ranks: list[int], first_step: int,
                           last_step: int, *, min_delay_ms: float = 3.0,
                           share: float = 0.25) -> pl.DataFrame:
    """For each of ``ranks``, in each group it belongs to: was it late there too?

    A compute straggler is late at every group it is in; a rank late at one group because
    another of its groups communicates slowly (its tensor-parallel transfers over a slow link
    make it late to its data-parallel all-reduce) is not late at that other group, where every
    member is slowed alike.

    Returns:
        Columns ``rank``, ``pg``, ``collectives``, ``wait_ms`` (the rank's mean wait per
        collective of the group over ``first_step..last_step``), ``peers_wait_ms`` (the median
        of its peers'), ``lag_ms`` (the difference: how late it came to each) and ``late``
        (``lag_ms`` at least ``min_delay_ms`` / the group's collectives per step, and
        ``share`` of its largest lag at any group: a compute straggler comes about equally
        late to every collective it waits for). Per collective, not per step: a group with
        one collective per step and another with four are compared alike.
    """
    df = _complete_collectives(
        events.select("rank", "step", "pg", "seq", "is_p2p", "pg_size", "status",
                      "duration_ns")
        .filter((pl.col("status") == "ok") & pl.col("step").is_between(first_step, last_step)
                & pl.col("duration_ns").is_not_null() & (pl.col("pg_size") > 1)),
        pl.col("duration_ns").min().alias("_min"))
    per = df.group_by("pg", "rank").agg(
        ((pl.col("duration_ns") - pl.col("_min")).mean() / 1e6).alias("wait_ms"),
        pl.len().alias("collectives"), pl.col("step").n_unique().alias("_steps"))
    out = []
    for r in ranks:
        mine = per.filter(pl.col("rank") == r)
        peers = per.filter(pl.col("pg").is_in(mine["pg"].implode()) & (pl.col("rank") != r)
                           ).group_by("pg").agg(pl.col("wait_ms").median().alias("peers_wait_ms"))
        out.append(mine.join(peers, on="pg").select("rank", "pg", "collectives", "_steps",
                                                    "wait_ms", "peers_wait_ms"))
    df = pl.concat(out) if out else per.select(
        "rank", "pg", "collectives", "_steps", "wait_ms").with_columns(
        pl.lit(0.0).alias("peers_wait_ms")).clear()
    lag = pl.col("peers_wait_ms") - pl.col("wait_ms")
    per_step = pl.col("collectives") / pl.col("_steps")
    return df.with_columns(lag.alias("lag_ms")).with_columns(
        ((pl.col("lag_ms") * per_step >= min_delay_ms)
         & (pl.col("lag_ms") >= share * pl.col("lag_ms").max().over("rank"))).alias("late")
    ).drop("_steps").sort("rank", "pg")


__all__ = ["compute_group_lateness", "compute_outside_ns", "compute_step_lateness"]

"""Per-step collective time of each rank: the rhythm a person can read at a glance.

A rank that arrives last at a blocking collective waits least, so a compute straggler shows
*less* collective time per step than its peers, and its peers show more.
"""

from __future__ import annotations

import polars as pl


def compute_step_comm(events: pl.DataFrame) -> pl.DataFrame:
    """Collective time per (rank, step) from the ``step`` column.

    Args:
        events: Rows of one job (``ringwatch.read_events``); rows without a step are ignored.

    Returns:
        Columns ``rank``, ``step``, ``collectives`` (count), ``comm_ns`` (time with at least
        one collective in flight, overlaps counted once), ``comm_sum_ns`` (sum of the
        host-side durations of the finished ones), ``span_ns`` (first start to last end of the
        step's collectives), all on the rank's monotonic clock; sorted by step then rank.
    """
    df = (events.filter(pl.col("step").is_not_null() & pl.col("mono_start_ns").is_not_null())
          .sort("rank", "step", "mono_start_ns"))
    end = pl.col("mono_end_ns").fill_null(pl.col("mono_start_ns"))
    # Overlapping collectives (DDP's buckets are in flight together) count once: merge the
    # intervals, a new one starting where the start passes every earlier end.
    reach = end.cum_max().shift(1).over("rank", "step")
    df = df.with_columns(((pl.col("mono_start_ns") > reach).fill_null(True))
                         .cast(pl.Int32).cum_sum().over("rank", "step").alias("_run"))
    runs = df.group_by("rank", "step", "_run").agg(
        (end.max() - pl.col("mono_start_ns").min()).alias("busy"))
    busy = runs.group_by("rank", "step").agg(pl.col("busy").sum().alias("comm_ns"))
    per = df.group_by("rank", "step").agg(
        pl.len().alias("collectives"),
        pl.col("duration_ns").filter(pl.col("status") == "ok").sum().alias("comm_sum_ns"),
        (end.max() - pl.col("mono_start_ns").min()).alias("span_ns"))
    return per.join(busy, on=["rank", "step"]).select(
        "rank", "step", "collectives", "comm_ns", "comm_sum_ns", "span_ns").sort("step", "rank")


def pivot_step_comm(step_comm: pl.DataFrame, *, value: str = "comm_ns") -> pl.DataFrame:
    """``step`` rows by ``rank`` columns of one value of :func:`compute_step_comm`."""
    wide = step_comm.pivot(on="rank", index="step", values=value, sort_columns=True)
    return wide.rename({c: f"rank{c}" for c in wide.columns if c != "step"}).sort("step")


def compute_phase_comm(step_comm: pl.DataFrame, onset_step: int | None, *,
                       warmup_steps: int = 2, settle_steps: int = 1,
                       value: str = "comm_ns") -> pl.DataFrame:
    """Each rank's median collective time per step before and after a change at ``onset_step``.

    Args:
        step_comm: Output of :func:`compute_step_comm`.
        onset_step: First step of the new phase (``None``: everything is "before").
        warmup_steps: Leading steps left out of "before" (DDP's first steps differ).
        settle_steps: Steps after ``onset_step`` left out of "after" (the change lands mid-step).
        value: Which column of ``step_comm`` to compare.

    Returns:
        Columns ``rank``, ``before_ns``, ``after_ns`` (null when that phase has no step),
        ``change_ns`` (after - before) and ``steps_before`` / ``steps_after``; sorted by rank.
    """
    step = pl.col("step")
    before = step >= warmup_steps
    after = pl.lit(False)
    if onset_step is not None:
        before = before & (step < onset_step)
        after = step >= onset_step + settle_steps
    out = step_comm.group_by("rank").agg(
        pl.col(value).filter(before).median().alias("before_ns"),
        pl.col(value).filter(after).median().alias("after_ns"),
        before.sum().alias("steps_before"), after.sum().alias("steps_after"))
    return out.with_columns((pl.col("after_ns") - pl.col("before_ns")).alias("change_ns")).select(
        "rank", "before_ns", "after_ns", "change_ns", "steps_before", "steps_after").sort("rank")


__all__ = ["compute_phase_comm", "compute_step_comm", "pivot_step_comm"]

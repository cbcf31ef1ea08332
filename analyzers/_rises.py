"""Ranks that fell behind within the job's first steps: their baseline ends where they did.

A rank's usual delay and the job's noise come from the job's first ``baseline_steps`` steps.
A rank that slows at the tenth of them would otherwise be judged by steps of its own fault:
its usual is half late, the noise is wider, no sum passes the threshold, and with its late
steps the majority of the baseline it reads as late "from the first steps" (structural
imbalance, by design, where it is the straggler it became).

So each rank's delays over the baseline steps are fitted with two levels, the first up to a
step and the second from it to the last baseline step (a rise that lasts; a few late steps
that end within the baseline fit no second level above the first), at the split that leaves
the smallest sum of absolute residuals. A rank rose there when, with at least
``min_baseline_steps`` before the split and ``persist`` from it, the second level is above
the first by ``rise_noise`` noise units (the pooled noise of the other ranks, at least the
floor: a rank's own rise must not widen the bar it is held to), the first level is on time
(under that bar: a rank late from the start that grew later is late from the start), at
most one step before the split is as late as the second level's bar, and at most one from it
is as early as the latest but one before it (a rise parts the steps). Its baseline is then
the steps before the split.
"""

from __future__ import annotations

import polars as pl

from ringwatch.analyzers._shifts import lasting_shifts
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as _D


def lasting_rises(head: pl.DataFrame, *, floor_ms: float,
                  min_baseline_steps: int = _D.min_baseline_steps,
                  persist: int = _D.persist_steps,
                  rise_noise: float = _D.imbalance_noise) -> pl.DataFrame:
    """``rank``, ``rose_step``: the ranks of ``head`` (``rank``, ``step``, ``delay_ms``: the
    baseline steps) that rose within it (the module), and the first step of the rise."""
    empty = pl.DataFrame(schema={"rank": head.schema.get("rank", pl.Int64),
                                 "rose_step": head.schema.get("step", pl.Int64)})
    df = head.select("rank", "step", pl.col("delay_ms").fill_null(0.0).alias("_x")).sort(
        "rank", "step")
    if df.is_empty() or df["rank"].n_unique() < 2:
        return empty
    # each rank's squared deviations about its own mean: the others' pooled, its bar
    per = df.group_by("rank").agg(
        ((pl.col("_x") - pl.col("_x").mean()) ** 2).sum().alias("_ss"), pl.len().alias("_n"),
        (pl.col("_x").max() - pl.col("_x").min()).alias("_span"))
    ss, n = float(per["_ss"].sum()), int(per["_n"].sum())
    per = per.with_columns(
        ((ss - pl.col("_ss")) / (n - pl.col("_n")).cast(pl.Float64).clip(lower_bound=1.0))
        .sqrt().clip(lower_bound=floor_ms).mul(rise_noise).alias("_limit"))
    # a rise of the bar needs the steps to span it at least
    per = per.filter(pl.col("_span") >= pl.col("_limit"))
    if per.is_empty():
        return empty
    df = df.join(per.select("rank", "_n"), on="rank").with_columns(
        (pl.col("step").rank("ordinal").over("rank") - 1).cast(pl.Int64).alias("_i"),
        pl.col("_x").alias("_y"))
    rose = lasting_shifts(df, key="rank", first=min_baseline_steps, persist=persist,
                          bar=pl.col("_limit"), per_key=per.select("rank", "_limit"))
    rose = rose.filter(pl.col("_before") < pl.col("_bar"))  # on time before it
    return (rose.join(df.select("rank", "_i", "step"), left_on=["rank", "_j"],
                      right_on=["rank", "_i"])
            .select("rank", pl.col("step").alias("rose_step")).sort("rank"))


__all__ = ["lasting_rises"]
